"""Parse the canonical text form (see printer.py) back into a Graph.

parse_graph(print_graph(g)) == g for every graph the printer can print. Syntax errors
raise GraphSyntaxError naming the line and column.
"""
from __future__ import annotations

import json
import re

from .errors import GraphSyntaxError, UsageError
from .graph import Graph, ModelDecl, Node, Placement, Value
from .lora import LoRA
from .parallel import DeviceMesh, Strategy
from .schedule import Schedule, Timing
from .types import WEIGHTS, Field, ModelSpec, PayloadSpec

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_VALUE = re.compile(r"%[A-Za-z0-9_.@~]+")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf|nan)")
_SPEC_KEYS = {"vocab": "vocab_size", "hidden": "hidden_size", "layers": "num_layers",
              "heads": "num_heads", "kv_heads": "num_kv_heads", "ffn": "intermediate_size",
              "ctx": "max_positions", "head": "head", "tied": "tie_embeddings",
              "dtype": "dtype", "type": "model_type", "head_dim": "head_dim",
              "qkv_bias": "qkv_bias", "o_bias": "o_bias", "mlp_bias": "mlp_bias",
              "qk_norm": "qk_norm", "rope_theta": "rope_theta",
              "rope_scaling": "rope_scaling", "window": "sliding_window",
              "act": "activation", "eps": "norm_eps", "lora": "lora"}
_SPEC_BOOLS = ("tie_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm")


class _Cursor:
    """A position in one line of text, with the small lexer the grammar needs."""

    def __init__(self, line: str, lineno: int):
        self.s, self.i, self.lineno = line, 0, lineno

    def fail(self, what: str) -> GraphSyntaxError:
        return GraphSyntaxError(f"line {self.lineno}, column {self.i + 1}: expected {what}\n"
                                f"  {self.s}\n  {' ' * self.i}^")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] == " ":
            self.i += 1

    def peek(self, lit: str) -> bool:
        self.ws()
        return self.s.startswith(lit, self.i)

    def take(self, lit: str) -> bool:
        if self.peek(lit):
            self.i += len(lit)
            return True
        return False

    def expect(self, lit: str) -> None:
        if not self.take(lit):
            raise self.fail(repr(lit))

    def match(self, pattern: re.Pattern, what: str) -> str:
        self.ws()
        m = pattern.match(self.s, self.i)
        if not m:
            raise self.fail(what)
        self.i = m.end()
        return m.group(0)

    def ident(self) -> str:
        return self.match(_IDENT, "a name")

    def value_name(self) -> str:
        return self.match(_VALUE, "a value name like %rollout")

    def integer(self) -> int:
        return int(self.match(re.compile(r"-?\d+"), "an integer"))

    def attr_value(self) -> object:
        self.ws()
        if self.peek('"'):
            try:
                value, end = json.JSONDecoder().raw_decode(self.s, self.i)
            except json.JSONDecodeError:
                raise self.fail("a string") from None
            self.i = end
            return value
        if self.take("true"):
            return True
        if self.take("false"):
            return False
        text = self.match(_NUMBER, "an attribute value")
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        return float(text)

    def at_end(self) -> bool:
        self.ws()
        return self.i >= len(self.s)

    def end(self) -> None:
        if not self.at_end():
            raise self.fail("end of line")


def _key_values(c: _Cursor, close: str) -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = []
    while not c.take(close):
        if items:
            c.expect(",")
        key = c.ident()
        c.expect("=")
        items.append((key, c.attr_value()))
    return items


def _model_spec(c: _Cursor) -> ModelSpec:
    family = c.ident()
    c.expect("{")
    kw: dict[str, object] = {}
    while not c.take("}"):
        if kw:
            c.expect(",")
        key = c.ident()
        if key not in _SPEC_KEYS:
            raise c.fail(f"one of {', '.join(_SPEC_KEYS)}")
        c.expect("=")
        kw[_SPEC_KEYS[key]] = _spec_value(c, key)
    for k in _SPEC_BOOLS:
        if k in kw:
            kw[k] = bool(kw[k])
    try:
        if "lora" in kw:
            kw["lora"] = LoRA.from_dict(kw["lora"])
        return ModelSpec(family, **kw)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError, UsageError) as e:   # heads=0: /0
        raise c.fail(f"a valid model spec ({e})") from None


def _spec_value(c: _Cursor, key: str) -> object:
    if key in ("head", "dtype", "type", "act"):
        return c.ident()
    if key in ("rope_theta", "eps"):
        return float(c.match(_NUMBER, "a number"))
    if key in ("rope_scaling", "lora"):   # a JSON object (ModelSpec.arch_text)
        c.ws()
        try:
            value, end = json.JSONDecoder().raw_decode(c.s, c.i)
        except json.JSONDecodeError:
            raise c.fail("a JSON object") from None
        if not isinstance(value, dict):
            raise c.fail("a JSON object")
        c.i = end
        return value
    return c.integer()


def _payload(c: _Cursor) -> PayloadSpec:
    kind = c.ident()
    c.expect("[")
    if kind == WEIGHTS:
        model = c.ident()
        c.expect(",")
        c.expect("bytes=")
        nbytes = c.integer()
        c.expect("]")
        return PayloadSpec(WEIGHTS, model=model, weight_bytes=nbytes)
    batch = c.integer()
    c.expect(",")
    c.expect("seq=")
    seq = c.integer()
    c.expect("]")
    c.expect("{")
    fields: list[Field] = []
    while not c.take("}"):
        if fields:
            c.expect(",")
        name = c.ident()
        c.expect(":")
        dtype = c.match(re.compile(r"[a-z0-9]+"), "a dtype")
        try:
            fields.append(Field(name, dtype, c.take("[s]")))
        except ValueError as e:
            raise c.fail(f"a valid field ({e})") from None
    return PayloadSpec(kind, batch, seq, tuple(fields))


def _expect_kind(c: _Cursor) -> str:
    if c.take("*"):
        return "*"
    kind = c.ident()
    if c.take("["):
        model = c.ident()
        c.expect("]")
        return f"{kind}[{model}]"
    return kind


def _node(c: _Cursor) -> Node:
    outs = [c.value_name()]
    while c.take(","):
        outs.append(c.value_name())
    c.expect("=")
    kind = c.ident()
    target = c.ident()
    model = ""
    if c.take("["):
        model = c.ident()
        c.expect("]")
    c.expect("(")
    inputs: list[str] = []
    while not c.take(")"):
        if inputs:
            c.expect(",")
        inputs.append(c.value_name())
    attrs = _key_values(c, "}") if c.take("{") else []
    c.expect(":")
    c.expect("(")
    expects: list[str] = []
    while not c.take(")"):
        if expects:
            c.expect(",")
        expects.append(_expect_kind(c))
    c.expect("->")
    specs = [_payload(c)]
    while c.take(","):
        specs.append(_payload(c))
    if len(specs) != len(outs):
        raise c.fail(f"{len(outs)} output types, one per output name")
    placement = None
    if c.take("@["):
        mesh_text = c.match(re.compile(r"[0-9,\-]+"), "GPU ids")
        c.expect("]")
        c.expect("{")
        strategy_text = c.match(re.compile(r"[a-z_=0-9,]*"), "a strategy")
        c.expect("}")
        try:
            placement = Placement(DeviceMesh.parse(mesh_text), Strategy.parse(strategy_text))
        except ValueError as e:
            raise c.fail(f"a valid placement ({e})") from None
    group = ""
    if c.take("par="):
        group = c.ident()
    timing = None
    if c.take("at{"):
        try:
            timing = Timing.from_attrs(_unique(c, _key_values(c, "}"), "timing"))
        except (TypeError, ValueError) as e:
            raise c.fail(f"a valid timing ({e})") from None
    c.end()
    return Node(kind, target, tuple(inputs), tuple(expects),
                tuple(Value(n, s) for n, s in zip(outs, specs)), model, tuple(sorted(attrs)),
                placement, group, timing)


def _unique(c: _Cursor, items: list[tuple[str, object]], what: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in items:
        if k in out:
            raise c.fail(f"one {k} in a {what}, not two")
        out[k] = v
    return out


def parse_graph(text: str) -> Graph:
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise GraphSyntaxError("empty graph text")
    lineno, first = lines[0]
    c = _Cursor(first, lineno)
    c.expect("graph")
    c.expect("@")
    name = c.ident()
    c.expect("{")
    c.end()
    models: list[ModelDecl] = []
    inputs: list[Value] = []
    nodes: list[Node] = []
    outputs: list[str] = []
    carries: list[tuple[str, str]] = []
    schedule = None
    closed = False
    for lineno, line in lines[1:]:
        c = _Cursor(line, lineno)
        if closed:
            raise c.fail("nothing after the closing '}'")
        if c.take("}"):
            c.end()
            closed = True
        elif c.take("model "):
            mname = c.ident()
            c.expect("=")
            spec = _model_spec(c)
            c.expect("role=")
            role = c.ident()
            trainable = c.take("trainable")
            if not trainable:
                c.expect("frozen")
            c.expect("engine=")
            engine = c.ident()
            base = c.ident() if c.take("base=") else ""
            c.end()
            models.append(ModelDecl(mname, spec, role, trainable, engine, base))
        elif c.take("schedule"):
            if schedule is not None:
                raise c.fail("one schedule line, not two")
            c.expect("{")
            try:
                schedule = Schedule.from_attrs(_unique(c, _key_values(c, "}"), "schedule"))
            except (TypeError, ValueError) as e:
                raise c.fail(f"a valid schedule ({e})") from None
            c.end()
        elif c.take("input "):
            vname = c.value_name()
            c.expect(":")
            inputs.append(Value(vname, _payload(c)))
            c.end()
        elif c.take("output "):
            outputs.append(c.value_name())
            while c.take(","):
                outputs.append(c.value_name())
            c.end()
        elif c.take("carry "):
            dst = c.value_name()
            c.expect("<-")
            carries.append((dst, c.value_name()))
            c.end()
        else:
            nodes.append(_node(c))
    if not closed:
        raise GraphSyntaxError(f"line {lines[-1][0]}: graph @{name} is not closed with '}}'")
    return Graph(name, tuple(models), tuple(inputs), tuple(nodes), tuple(outputs),
                 tuple(carries), schedule)
