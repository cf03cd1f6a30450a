"""Pass infrastructure: Pass, PassContext, and a pipeline with verify/dump/timing.

A pass is a frozen dataclass with a `name` and options as fields; `run(graph, ctx)`
returns a new Graph and never mutates its input. A pipeline is written as a spec string,
`assign-devices{policy=auto},choose-overlap,insert-reshard`, verifies after every pass
when `ctx.check` is on, writes numbered dumps (`000_traced.txt`, `001_assign-devices.txt`,
...) when `ctx.dump_dir` is set, and times each pass.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from graphrl.cluster import ClusterSpec
from graphrl.cost import CALIBRATED, CostParams
from graphrl.errors import UsageError
from graphrl.graph import Graph
from graphrl.outputs import atomic_write_text
from graphrl.lengths import LengthDist
from graphrl.verify import verify_graph

from .search import DEFAULT_HEADROOM, Pin


@dataclass
class PassContext:
    """What passes share: the cluster, options, and what they found (the search's
    evaluation, reshard plans) for later passes and reports. Not frozen: passes record
    findings here, the graph itself stays immutable."""

    cluster: ClusterSpec
    gen_engine: str = "hf"
    params: CostParams = CALIBRATED
    pins: Mapping[str, Pin] = field(default_factory=dict)
    check: bool = True
    dump_dir: Path | None = None
    lengths: LengthDist | None = None   # response lengths; None = all max_new_tokens
    headroom: float = DEFAULT_HEADROOM  # share of GPU / host memory plans leave free
    findings: dict[str, Any] = field(default_factory=dict)
    timings: list[tuple[str, float]] = field(default_factory=list)
    progress: Callable[[str, int], None] | None = None   # (stage, evaluations) sink


class Pass(Protocol):
    name: str

    def run(self, graph: Graph, ctx: PassContext) -> Graph: ...


def _registry() -> dict[str, type]:
    from .assign_devices import AssignDevices
    from .choose_overlap import ChooseOverlap
    from .insert_reshard import InsertReshard
    from .staleness import Staleness

    return {p.name: p for p in (Staleness, AssignDevices, ChooseOverlap, InsertReshard)}


_SPEC = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def parse_pipeline(spec: str) -> list[Any]:
    """`assign-devices{policy=auto},choose-overlap` -> pass instances."""
    passes, pos, known = [], 0, _registry()
    spec = spec.strip()
    while pos < len(spec):
        m = _SPEC.match(spec, pos)
        if not m or m.end() == pos:
            raise UsageError(f"bad pass pipeline {spec!r} at position {pos}")
        name, opts = m.group(1), m.group(2)
        if name not in known:
            raise UsageError(f"unknown pass {name!r} (known: {', '.join(known)})")
        cls = known[name]
        kw: dict[str, Any] = {}
        for item in filter(None, (o.strip() for o in (opts or "").split(","))):
            k, _, v = item.partition("=")
            names = {f.name: f for f in fields(cls)}
            if k not in names or k == "name":
                raise UsageError(f"pass {name} has no option {k!r}")
            kw[k] = int(v) if v.isdigit() else v
        passes.append(cls(**kw))
        pos = m.end()
    return passes


def run_pipeline(graph: Graph, passes: list[Any], ctx: PassContext,
                 on_pass: Callable[[str, Graph], None] | None = None) -> Graph:
    """Run passes in order; verify after each (ctx.check), dump and time each."""
    if ctx.dump_dir is not None:
        ctx.dump_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.dump_dir / "000_traced.txt", graph.text())
    for i, p in enumerate(passes, start=1):
        if ctx.progress is not None:
            ctx.progress(p.name, 0)
        t0 = time.perf_counter()
        graph = p.run(graph, ctx)
        ctx.timings.append((p.name, time.perf_counter() - t0))
        if ctx.check:
            verify_graph(graph)
        if ctx.dump_dir is not None:
            atomic_write_text(ctx.dump_dir / f"{i:03d}_{p.name}.txt", graph.text())
        if on_pass is not None:
            on_pass(p.name, graph)
    return graph
