"""Pass infrastructure: pipeline specs with typed options, and the runner that verifies,
dumps and times each pass.

A pass is a frozen dataclass with a `name` and its options as typed fields; `run(ir,
ctx)` returns a new graph (or, for `lower`, the Plan) and never mutates its input. A
pipeline is written as a spec, `assign-devices{policy=auto},choose-overlap,
insert-reshard{exact=true},lower`: options are coerced from text by their declared
field type (int, float, bool, str) and checked by the pass; an unknown, duplicate or
ill-typed option is an error naming the pass. The runner verifies after every pass
(`ctx.check`), writes numbered dumps (`000_traced.txt`, `001_assign-devices.txt`, ...)
when `ctx.dump_dir` is set, and times each pass. Each pass sees the passes after it in
`ctx.rest` (assign-devices ranks its finalists by running them).
"""
from __future__ import annotations

import re
import time
import typing
from dataclasses import MISSING, fields
from typing import Any, Callable

from graphrl.errors import UsageError
from graphrl.graph import Graph
from graphrl.outputs import atomic_write_text
from graphrl.plan import Plan
from graphrl.verify import verify_graph, verify_plan

from .context import PassContext, SearchResult
from .registry import PASSES

_SPEC = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^}]*)\})?\s*(?:,|$)")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def option_fields(cls: type) -> dict[str, type]:
    """A pass's options: field name -> declared type (the `name` field excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.name != "name"}


def _coerce(pass_name: str, key: str, text: str, kind: type) -> Any:
    try:
        if kind is bool:
            if text.lower() not in _BOOLS:
                raise ValueError
            return _BOOLS[text.lower()]
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return str(text)
    except ValueError:
        raise UsageError(f"pass {pass_name}: option {key}={text!r} is not a "
                         f"{kind.__name__}") from None


def parse_pipeline(spec: str) -> list[Any]:
    """`assign-devices{policy=auto},choose-overlap` -> pass instances."""
    passes, pos = [], 0
    spec = spec.strip()
    if not spec:
        raise UsageError("empty pass pipeline (known passes: " + ", ".join(PASSES) + ")")
    while pos < len(spec):
        m = _SPEC.match(spec, pos)
        if not m or m.end() == pos:
            raise UsageError(f"bad pass pipeline {spec!r} at position {pos}")
        name, opts = m.group(1), m.group(2)
        if name not in PASSES:
            raise UsageError(f"unknown pass {name!r} (known: {', '.join(PASSES)})")
        cls = PASSES[name]
        known = option_fields(cls)
        kw: dict[str, Any] = {}
        for item in (o.strip() for o in (opts or "").split(",")):
            if not item:
                continue
            k, eq, v = (s.strip() for s in item.partition("="))
            if k not in known:
                have = ", ".join(known) or "none"
                raise UsageError(f"pass {name} has no option {k!r} (its options: {have})")
            if not eq:
                raise UsageError(f"pass {name}: option {k} needs a value ({k}=...)")
            if k in kw:
                raise UsageError(f"pass {name}: option {k} given twice")
            kw[k] = _coerce(name, k, v, known[k])
        try:
            passes.append(cls(**kw))
        except (ValueError, TypeError) as e:
            raise UsageError(f"pass {name}: {e}") from None
        pos = m.end()
    for p in passes[:-1]:
        if p.name == "lower":
            raise UsageError("pass lower makes the plan: it must be the pipeline's last pass")
    return passes


def pipeline_text(passes: list[Any]) -> str:
    """The spec of these passes with every option written out (parse_pipeline's inverse)."""
    out = []
    for p in passes:
        opts = []
        for f in fields(p):
            if f.name == "name":
                continue
            v = getattr(p, f.name)
            opts.append(f"{f.name}={str(v).lower() if isinstance(v, bool) else v}")
        out.append(p.name + (f"{{{','.join(opts)}}}" if opts else ""))
    return ",".join(out)


def run_pipeline(graph: Graph, passes: list[Any], ctx: PassContext,
                 on_pass: Callable[[str, Any], None] | None = None) -> Any:
    """Run passes in order; verify after each (ctx.check), dump and time each. Returns
    the last pass's result: a Graph, or the Plan when the pipeline ends with lower."""
    if ctx.dump_dir is not None:
        ctx.dump_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.dump_dir / "000_traced.txt", graph.text())
    ir: Any = graph
    for i, p in enumerate(passes, start=1):
        if not isinstance(ir, Graph):
            raise UsageError(f"pass {p.name} needs a graph, but the pass before it made a plan")
        if ctx.progress is not None:
            ctx.progress(p.name, 0)
        ctx.rest = tuple(passes[i:])
        t0 = time.perf_counter()
        ir = p.run(ir, ctx)
        ctx.timings.append((p.name, time.perf_counter() - t0))
        if ctx.check:
            verify_plan(ir) if isinstance(ir, Plan) else verify_graph(ir)
        if ctx.dump_dir is not None:
            atomic_write_text(ctx.dump_dir / f"{i:03d}_{p.name}.txt", _dump_text(ir))
        if on_pass is not None:
            on_pass(p.name, ir)
    ctx.rest = ()
    return ir


def _dump_text(ir: Any) -> str:
    if isinstance(ir, Plan):
        from graphrl.dump import plan_text

        return plan_text(ir)
    return ir.text()


__all__ = ["PassContext", "SearchResult", "parse_pipeline",
           "pipeline_text", "run_pipeline", "option_fields"]
