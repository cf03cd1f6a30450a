"""compile(graph, cluster, policy) -> Plan: the pass pipeline end to end."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .cluster import ClusterSpec
from .graph import Graph
from .plan import Plan

# price-stream prices an asynchronous step's streamed generation (a no-op otherwise);
# `search`: choose its cut (the async compile of a staleness rewrite) or keep the graph's
DEFAULT_PIPELINE = ("assign-devices{{policy={policy}}},choose-overlap,insert-reshard,"
                    "price-stream{{search={search}}},lower")


@dataclass(frozen=True)
class Compiled:
    """A compile's plan, the placed graph it was lowered from (its text lowers to the same
    plan: `graphrl lower`), the pipeline that made it, and for reports the placement
    search behind it (`problem`, `evaluation`) and, with --staleness, the asynchronous
    search's findings."""

    plan: Plan
    graph: Graph
    findings: Mapping[str, Any]
    timings: tuple[tuple[str, float], ...]
    pipeline: str = ""
    problem: Any = field(default=None, compare=False)
    evaluation: Any = field(default=None, compare=False)
    stream: Any = field(default=None, compare=False)   # passes/price_stream.StreamReport

    @property
    def compile_seconds(self) -> float:
        return sum(t for _, t in self.timings)


def compile_graph(graph: Graph, cluster: ClusterSpec, policy: str = "auto", *,
                  placement: Mapping[str, Mapping[str, Any]] | None = None,
                  gen_engine: str = "hf", check: bool = True,
                  dump_dir: str | Path | None = None, engines: bool = False,
                  response_lengths: Any = None, memory_headroom: float | None = None,
                  progress: Any = None, staleness: int = 0,
                  pipeline: str | None = None, search_stream: bool = False) -> Compiled:
    """Place, schedule, reshard and lower a traced graph for a cluster. `engines`: refuse
    a call whose strategy no engine of graphrl runs (graphrl.engines; on for plans that
    are run: the Ray launcher and `graphrl compile` outside planning-only mode).
    `response_lengths`: a `graphrl.lengths.LengthDist` (or its text, `lognormal:mean=..,
    max=..`) the generation cost is priced over; None = every response max_new_tokens.
    `memory_headroom`: share of each GPU's and node's memory left free (default 8%).
    `progress`: a (stage, evaluations) sink told as the passes and the search go on
    (graphrl.progress.Progress prints it for long compiles).
    `pipeline`: a pass pipeline spec (passes/base.py) ending in `lower`; default
    DEFAULT_PIPELINE with `policy` and `search_stream` (price-stream chooses the stream
    cut of a graph rewritten for staleness instead of pricing its own).
    `staleness` K >= 1: also price asynchronous steps (graphrl.async_cost); if they beat
    the synchronous step, the plan is for the graph rewritten for staleness K
    (passes/staleness.py) with generation and training on the chosen disjoint pools.
    findings["staleness"] says which was chosen, findings["async"] the async plan."""
    if staleness:
        from .async_compile import compile_with_staleness

        return compile_with_staleness(graph, cluster, policy, staleness,
                                      compile_sync=compile_graph, placement=placement,
                                      gen_engine=gen_engine, check=check, dump_dir=dump_dir,
                                      engines=engines, response_lengths=response_lengths,
                                      memory_headroom=memory_headroom, progress=progress,
                                      pipeline=pipeline)
    from graphrl.passes.assign_devices import parse_pins
    from graphrl.passes.base import PassContext, parse_pipeline, pipeline_text, run_pipeline

    from .errors import UsageError
    from .lengths import parse as parse_lengths

    if isinstance(response_lengths, str):
        response_lengths = parse_lengths(response_lengths)
    pins = parse_pins(placement or {}, graph, cluster)
    ctx = PassContext(cluster, gen_engine=gen_engine, pins=pins, check=check,
                      dump_dir=Path(dump_dir) if dump_dir else None,
                      lengths=response_lengths, progress=progress, engines=engines)
    if memory_headroom is not None:
        if not 0 <= memory_headroom < 1:
            raise UsageError(f"memory headroom must be in [0, 1), got {memory_headroom!r}")
        ctx.headroom = memory_headroom
    passes = parse_pipeline(pipeline or DEFAULT_PIPELINE.format(
        policy=policy, search=str(bool(search_stream)).lower()))
    if passes[-1].name != "lower":
        raise UsageError(f"pipeline {pipeline_text(passes)!r} does not end with lower: a "
                         "compile makes a plan")
    plan = run_pipeline(graph, passes, ctx)
    search = ctx.search
    report = ctx.stream
    findings = ({"stream": report.choice, "stream_split": report.split}
                if report is not None else {})
    return Compiled(plan, plan.graph, findings, tuple(ctx.timings), pipeline_text(passes),
                    search.problem if search else None,
                    search.evaluation if search else None, report)
