"""The user API: declare models, write a step in plain Python, trace it into a Graph.

    policy = Model("policy", llama_config, role="policy", trainable=True)
    ...
    def step(prompts, policy, reference, reward):
        rollout = policy.generate(prompts, max_new_tokens=16)
        ...
    program = trace(step, models=[policy, reference, reward], prompts=prompts_spec(32, 8))

Tracing calls the step once with stand-ins: each model argument is a handle whose
methods record call nodes, each data argument a TracedValue; ops (graphrl.ops) record op
nodes. Nothing global: the tracer travels inside the handles and values.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from . import signatures as sig
from .builtin_losses import BUILTIN
from .errors import TraceError, UsageError
from .graph import CALL, OP, Graph, ModelDecl, Node, Value
from .hf_dir import is_model_dir, read_config
from .loss_def import LossDef
from .loss_def import resolve as resolve_loss
from .model_checks import check_model_fields
from .lora import LoRA
from .printer import format_attr
from .train_options import check_train_options
from .types import PRECISIONS, Field, ModelSpec, PayloadSpec, weights_spec


@dataclass(frozen=True)
class Model:
    """A model of the RL step, as the user declares it.

    config: a local Hugging Face model directory (its config.json is planned from and its
    weights and tokenizer loaded), a transformers config (llama, mistral, qwen2, qwen3,
    gpt2), its dict, or a ModelSpec.
    head: lm (policy, reference), value (critic) or score (reward model).
    options: engine settings (lr, weight_decay, grad_clip, ...).
    init_from: name of a model whose initial weights this one copies (a reference model
    starts as the policy).
    precision: "bf16" (bf16 mixed precision: bf16 compute and activations, fp32 master
    weights and Adam state when it trains, bf16 weights only when frozen) or "fp32"; None
    keeps a ModelSpec config's own `dtype`, else bf16. The plan carries it as the model
    spec's `dtype`, and every engine runs it (docs/engines.md).
    lora: a graphrl.LoRA: train low-rank adapters, the weights frozen (docs/lora.md).
    shares_base: the name of a model with LoRA whose frozen base this (frozen, lm) model
    is, e.g. a reference that starts as the policy: it runs on that model's weights with
    the adapters off and holds none of its own.
    """

    name: str
    config: Any
    role: str
    trainable: bool = False
    head: str = "lm"
    engine: str = "hf"
    options: Mapping[str, Any] = field(default_factory=dict)
    init_from: str = ""
    precision: str | None = None
    lora: LoRA | None = None
    shares_base: str = ""

    def __post_init__(self) -> None:
        check_model_fields(self.name, self.role, self.head, self.engine, self.options)
        if self.lora is not None and not isinstance(self.lora, LoRA):
            raise UsageError(f"model {self.name}: lora={self.lora!r} is not a graphrl.LoRA")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"model {self.name}: unknown precision {self.precision!r} "
                             f"(allowed: {', '.join(PRECISIONS)})")

    @property
    def checkpoint(self) -> str | None:
        """The model directory the weights load from (None: random init)."""
        return str(self.config) if is_model_dir(self.config) else None

    @property
    def spec(self) -> ModelSpec:
        if isinstance(self.config, ModelSpec):
            return replace(self.config, head=self.head, lora=self.lora,
                           dtype=self.precision or self.config.dtype)
        config = read_config(self.config) if is_model_dir(self.config) else self.config
        try:
            spec = ModelSpec.from_hf_config(config, head=self.head)
        except (KeyError, ValueError, TypeError) as e:
            where = self.checkpoint or "its config"
            raise TraceError(f"model {self.name} ({where}): graphrl cannot read this "
                             f"config (llama, mistral, qwen2, qwen3 or gpt2): "
                             f"{type(e).__name__} {e}") from None
        return replace(spec, dtype=self.precision or "bf16", lora=self.lora)

    def engine_options(self) -> dict[str, Any]:
        """What the engine is built with: `options`, plus the checkpoint directory."""
        return {**self.options, **({"checkpoint": self.checkpoint} if self.checkpoint else {})}

    def decl(self) -> ModelDecl:
        return ModelDecl(self.name, self.spec, self.role, self.trainable, self.engine,
                         self.shares_base)


@dataclass(frozen=True)
class OpDef:
    """A pure tensor op usable in a step: `fn(*payload_dicts, **attrs)` returns one dict
    per output. `inputs` are the payload kinds it takes; `outputs` (name, kind, fields)
    what it returns, with the batch and sequence length of its first data input. The
    attributes of a call are checked against fn's keyword arguments when it is traced;
    `check(where, input_specs, attrs)`, if given, runs then too: it raises a TraceError
    for bad attributes or payloads and returns the outputs' batch (None: the first
    input's), e.g. the kept batch of a filtering op (graphrl/sampling.py)."""

    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, str, tuple[Field, ...]], ...]
    check: Callable[[str, tuple[PayloadSpec, ...], Mapping[str, Any]], int | None] | None = None

    def __call__(self, *args: "TracedValue", **attrs: Any) -> Any:
        if not args or not all(isinstance(a, TracedValue) for a in args):
            raise TraceError(f"op {self.name}: call it inside a step on traced values")
        outs = args[0].tracer.record_op(self, args, attrs)
        return outs[0] if len(outs) == 1 else outs


@dataclass(frozen=True)
class Program:
    """A traced step: the Graph plus what runs it (models' engine settings, op kernels,
    the losses its train nodes optimise)."""

    graph: Graph
    models: Mapping[str, Model]
    ops: Mapping[str, OpDef]
    losses: Mapping[str, LossDef] = field(default_factory=dict)

    def loss(self, name: str) -> LossDef:
        """The loss a train node names: the step's own, or a built-in (a rewrite such as
        passes/staleness may substitute a built-in the step did not name)."""
        return resolve_loss(name, {**BUILTIN, **self.losses}, "train")


class TracedValue:
    """A stand-in for a payload while tracing."""

    def __init__(self, tracer: "Tracer", name: str, spec: PayloadSpec):
        self.tracer, self.name, self.spec = tracer, name, spec

    def __repr__(self) -> str:
        return f"<{self.name}: {self.spec.text()}>"

    def __bool__(self) -> bool:
        raise TraceError(f"{self.name} is a traced payload: a step cannot branch on its "
                         "contents (use an op)")


class ModelHandle:
    """What a step receives for each model: calling a method records a call node."""

    def __init__(self, tracer: "Tracer", model: Model):
        self._tracer, self._model = tracer, model

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        decl = self._tracer.decls[self._model.name]
        if method not in decl.methods:
            raise TraceError(f"{self._model.name}.{method}: model {self._model.name!r} "
                             f"(role {decl.role}, head {decl.spec.head}, "
                             f"{'trainable' if decl.trainable else 'frozen'}) has no method "
                             f"{method!r}; its methods are {', '.join(decl.methods)}")
        call = getattr(self._tracer, f"call_{method}")
        where = f"{self._model.name}.{method}"

        def bound(*args: Any, **kwargs: Any) -> Any:
            check_arguments(where, call, (self._model, *args), kwargs)
            return call(self._model, *args, **kwargs)
        return bound


def check_arguments(where: str, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: Mapping[str, Any], skip: int = 1) -> None:
    """A TraceError naming the call and the unknown or missing argument (with the nearest
    known name) unless fn(*args, **kwargs) binds to fn's signature; the first `skip`
    parameters are not the user's to name."""
    from .nearest import suggest

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):   # a builtin or C function: nothing to check against
        return
    params = signature.parameters
    names = [p for p, v in params.items()
             if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
    if any(v.kind is v.VAR_KEYWORD for v in params.values()):
        names = []
    for key in kwargs:
        if names and key not in names:
            raise TraceError(f"{where}: unknown argument {key!r}{suggest(key, names)} "
                             f"(it takes {', '.join(names[skip:])})")
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TraceError(f"{where}: {e}") from None


class Tracer:
    def __init__(self, name: str, models: list[Model]):
        self.name = name
        self.decls = {m.name: m.decl() for m in models}
        self.models = {m.name: m for m in models}
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.names: set[str] = set()
        self.weights: dict[str, str] = {}   # model -> value name of its current weights
        self.versions: dict[str, int] = {}
        self.ops: dict[str, OpDef] = {}
        self.losses: dict[str, LossDef] = {}   # the losses the train calls use, by name

    # -- names and values -------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, k = f"%{base}", 1
        while name in self.names:
            name, k = f"%{base}.{k}", k + 1
        self.names.add(name)
        return name

    def add_input(self, base: str, spec: PayloadSpec) -> TracedValue:
        name = self.fresh(base)
        self.inputs.append(Value(name, spec))
        return TracedValue(self, name, spec)

    def _check(self, where: str, value: Any, kind: str) -> TracedValue:
        if not isinstance(value, TracedValue):
            raise TraceError(f"{where}: expected a traced {kind} payload, got "
                             f"{type(value).__name__} {value!r}")
        if value.tracer is not self:
            raise TraceError(f"{where}: {value.name} comes from another trace")
        if value.spec.kind != kind:
            raise TraceError(f"{where}: payload mismatch: {value.name} is "
                             f"{value.spec.kind} but {where} takes {kind}")
        return value

    def _attrs(self, where: str, attrs: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        for k, v in attrs.items():
            try:
                format_attr(v)
            except TypeError as e:
                raise TraceError(f"{where}: argument {k}={v!r}: {e}") from None
        return tuple(sorted(attrs.items()))

    def _record(self, kind: str, target: str, model: str, args: list[TracedValue],
                expects: list[str], outs: list[tuple[str, PayloadSpec]],
                attrs: tuple[tuple[str, Any], ...]) -> list[TracedValue]:
        values = [Value(self.fresh(base), spec) for base, spec in outs]
        self.nodes.append(Node(kind, target, tuple(a.name for a in args), tuple(expects),
                               tuple(values), model, attrs))
        return [TracedValue(self, v.name, v.spec) for v in values]

    def weights_spec(self, model: str) -> PayloadSpec:
        """The Weights payload of `model`: 0 bytes for a shared base (graphrl.lora), which
        holds none of its own."""
        decl = self.decls[model]
        spec = weights_spec(model, decl.spec)
        return replace(spec, weight_bytes=0) if decl.shares_base else spec

    def _weights(self, model: Model) -> TracedValue:
        return TracedValue(self, self.weights[model.name], self.weights_spec(model.name))

    # -- model methods ----------------------------------------------------------------
    def call_generate(self, model: Model, prompts: Any, *, max_new_tokens: int,
                      temperature: float = 1.0, samples: int = 1, top_p: float = 1.0,
                      top_k: int = 0, stop: str = "", stop_at_eos: bool = True
                      ) -> TracedValue:
        """Rows end at the model's EOS (unless stop_at_eos=False), at the `stop` string,
        or after max_new_tokens; top_p / top_k filter the sampled distribution."""
        where = f"{model.name}.generate"
        p = self._check(where, prompts, sig.PROMPTS)
        spec = self.decls[model.name].spec
        checks = [(isinstance(max_new_tokens, int) and max_new_tokens >= 1,
                   f"max_new_tokens={max_new_tokens!r} must be an int >= 1"),
                  (isinstance(samples, int) and samples >= 1,
                   f"samples={samples!r} must be an int >= 1"),
                  (isinstance(temperature, (int, float)) and temperature >= 0,
                   f"temperature={temperature!r} must be a number >= 0 (0: greedy)"),
                  (isinstance(top_p, (int, float)) and 0 < top_p <= 1,
                   f"top_p={top_p!r} must be in (0, 1]"),
                  (isinstance(top_k, int) and top_k >= 0, f"top_k={top_k!r} must be an int >= 0"),
                  (isinstance(stop, str), f"stop={stop!r} must be a string")]
        for ok, message in checks:
            if not ok:
                raise TraceError(f"{where}: {message}")
        seq = p.spec.seq + int(max_new_tokens)
        if seq > spec.max_positions:
            raise TraceError(f"{where}: prompt {p.spec.seq} + {max_new_tokens} new tokens = "
                             f"{seq} exceeds the model's context of {spec.max_positions}")
        extra = dict(top_p=float(top_p), top_k=int(top_k), stop=stop,
                     stop_at_eos=bool(stop_at_eos))
        defaults = dict(top_p=1.0, top_k=0, stop="", stop_at_eos=True)
        attrs = self._attrs(where, dict(max_new_tokens=int(max_new_tokens),
                                        temperature=float(temperature), samples=int(samples),
                                        **{k: v for k, v in extra.items() if v != defaults[k]}))
        w = self._weights(model)
        out = sig.rollout_spec(p.spec.batch * samples, seq)
        return self._record(CALL, "generate", model.name, [w, p],
                            [f"Weights[{model.name}]", sig.PROMPTS], [("rollout", out)],
                            attrs)[0]

    def call_forward(self, model: Model, rollout: Any) -> TracedValue:
        where = f"{model.name}.forward"
        r = self._check(where, rollout, sig.ROLLOUT)
        out, suffix = sig.forward_spec(self.decls[model.name].spec.head, r.spec)
        return self._record(CALL, "forward", model.name, [self._weights(model), r],
                            [f"Weights[{model.name}]", sig.ROLLOUT],
                            [(f"{model.name}_{suffix}", out)], ())[0]

    def call_train(self, model: Model, *, loss: Any, **kwargs: Any) -> TracedValue:
        """`loss`: a built-in's name or a LossDef (@graphrl.loss); the call's payloads by
        the loss's input names, its options and the loop's (epochs, minibatches)."""
        where = f"{model.name}.train"
        defn = resolve_loss(loss, {**BUILTIN, **self.losses}, where)
        known = self.losses.get(defn.name) or BUILTIN.get(defn.name)
        if known is not None and known != defn:
            raise TraceError(f"{where}: two different losses share the name {defn.name!r}"
                             f" ({defn.where()} and {known.where()}); rename one")
        wanted = defn.inputs
        options = {k: v for k, v in kwargs.items() if k not in dict(wanted)}
        if defn.prepare is not None:
            options = defn.prepare(options)
        check_train_options(where, defn, options)
        left_out = [k for k in defn.optional if k not in kwargs]
        if left_out:
            passes = {k: kwargs.get(k, 1) for k in ("epochs", "minibatches")}
            if any(v != 1 for v in passes.values()):
                raise TraceError(f"{where}: {', '.join(left_out)} may be left out only for "
                                 "one optimizer pass (epochs=1, minibatches=1), got "
                                 + ", ".join(f"{k}={v}" for k, v in passes.items())
                                 + "; pass the old log-probs (policy.forward(rollout))")
            wanted = tuple((k, t) for k, t in wanted if k not in left_out)
        missing = [k for k, _ in wanted if k not in kwargs]
        if missing:
            raise TraceError(f"{where}: loss {defn.name!r} needs argument(s) "
                             f"{', '.join(missing)} "
                             f"(it takes {', '.join(f'{k}: {t}' for k, t in wanted)})")
        args = [self._check(f"{where} argument {k}", kwargs[k], kind) for k, kind in wanted]
        batches = {a.spec.batch for a in args}
        if len(batches) > 1:
            raise TraceError(f"{where}: payload mismatch: inputs disagree on batch size "
                             + ", ".join(f"{a.name}={a.spec.batch}" for a in args))
        attrs = self._attrs(where, dict(options, loss=defn.name))
        self.losses[defn.name] = defn
        w = self._weights(model)
        version = self.versions[model.name] + 1
        outs = self._record(CALL, "train", model.name, [w] + args,
                            [f"Weights[{model.name}]"] + [k for _, k in wanted],
                            [(f"{model.name}@{version}", w.spec),
                             (f"{model.name}_stats", sig.stats_spec(defn.stats))], attrs)
        self.weights[model.name], self.versions[model.name] = outs[0].name, version
        return outs[1]

    # -- ops ----------------------------------------------------------------------------
    def record_op(self, op: OpDef, args: tuple[TracedValue, ...],
                  attrs: Mapping[str, Any]) -> list[TracedValue]:
        where = f"op {op.name}"
        if len(args) != len(op.inputs):
            raise TraceError(f"{where}: takes {len(op.inputs)} payloads "
                             f"({', '.join(op.inputs)}), got {len(args)}")
        checked = [self._check(f"{where} argument {i + 1}", a, kind) if kind != "*" else a
                   for i, (a, kind) in enumerate(zip(args, op.inputs))]
        known = self.ops.setdefault(op.name, op)
        if known is not op:
            raise TraceError(f"{where}: two different ops share the name {op.name!r}")
        check_arguments(where, op.fn, tuple(checked), attrs, skip=len(checked))
        first = checked[0].spec
        batch = op.check(where, tuple(a.spec for a in checked), attrs) if op.check else None
        outs = [(name, PayloadSpec(kind, first.batch if batch is None else batch, first.seq,
                                   fields))
                for name, kind, fields in op.outputs]
        return self._record(OP, op.name, "", checked, list(op.inputs), outs,
                            self._attrs(where, attrs))

    # -- the graph ------------------------------------------------------------------------
    def graph(self, outputs: list[str]) -> Graph:
        carries = tuple((f"%{m}@0", w) for m, w in self.weights.items() if w != f"%{m}@0")
        return Graph(self.name, tuple(self.decls.values()), tuple(self.inputs),
                     tuple(self.nodes), tuple(outputs), carries)


def _rename(g: Graph, old: str, new: str) -> Graph:
    def fix(name: str) -> str:
        return new if name == old else name
    nodes = tuple(replace(n, inputs=tuple(map(fix, n.inputs)),
                          outputs=tuple(Value(fix(v.name), v.spec) for v in n.outputs))
                  for n in g.nodes)
    return replace(g, nodes=nodes, outputs=tuple(map(fix, g.outputs)),
                   carries=tuple((fix(a), fix(b)) for a, b in g.carries))


def trace(step: Callable[..., Any], models: list[Model], name: str | None = None,
          **inputs: PayloadSpec) -> Program:
    """Trace `step` into a Program. Its parameters are matched by name: each model by
    its name, each data input by a keyword given here (e.g. prompts=prompts_spec(...))."""
    from .verify import verify_graph

    name = name or step.__name__
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise TraceError(f"step {name}: two models share a name")
    for m in models:
        if m.init_from and m.init_from not in by_name:
            raise TraceError(f"model {m.name}: init_from={m.init_from!r} is not a model")
        if m.shares_base and m.shares_base not in by_name:
            raise TraceError(f"model {m.name}: shares_base={m.shares_base!r} is not a model")
    tracer = Tracer(name, models)
    kwargs: dict[str, Any] = {}
    for pname in inspect.signature(step).parameters:
        if pname in by_name:
            kwargs[pname] = ModelHandle(tracer, by_name[pname])
        elif pname in inputs:
            kwargs[pname] = tracer.add_input(pname, inputs[pname])
        else:
            raise TraceError(f"step {name}: parameter {pname!r} is neither a model "
                             f"({', '.join(by_name)}) nor a given input "
                             f"({', '.join(inputs) or 'none'})")
    for m in models:
        w = tracer.add_input(f"{m.name}@0", tracer.weights_spec(m.name))
        tracer.weights[m.name], tracer.versions[m.name] = w.name, 0
    result = step(**kwargs)
    if not isinstance(result, Mapping) or not all(isinstance(v, TracedValue)
                                                  for v in result.values()):
        raise TraceError(f"step {name} must return a dict of traced payloads, e.g. "
                         "{'score': scores}")
    seen: dict[str, str] = {}
    for key, value in result.items():
        if value.name in seen:
            raise TraceError(f"step {name}: outputs {seen[value.name]!r} and {key!r} are the "
                             "same value; return each payload once")
        seen[value.name] = key
    graph = tracer.graph([v.name for v in result.values()])
    for key, value in result.items():
        if f"%{key}" != value.name:
            if f"%{key}" in tracer.names:
                raise TraceError(f"step {name}: output name {key!r} is already a value")
            graph = _rename(graph, value.name, f"%{key}")
            tracer.names.add(f"%{key}")
    return Program(verify_graph(graph), by_name, dict(tracer.ops), dict(tracer.losses))
