"""compile_graph with `staleness` K >= 1: the synchronous plan, the best asynchronous
split (graphrl.async_cost), and whichever step is faster lowered as the plan."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from .cluster import ClusterSpec
from .graph import Graph


def compile_with_staleness(graph: Graph, cluster: ClusterSpec, policy: str, staleness: int,
                           *, compile_sync: Callable[..., Any],
                           placement: Mapping[str, Mapping[str, Any]] | None = None,
                           **kw: Any) -> Any:
    """The synchronous compile of `graph`, and, when async pays, the compile of its
    staleness-K rewrite pinned to the async plan's pools; `compile_sync` is the
    synchronous compiler (graphrl.compiler.compile_graph, which calls this one: passed in,
    so the two modules do not import each other). `Compiled.findings` gains
    "staleness" (the chosen K, 0 = synchronous), "async" (the best AsyncPlan or None),
    "async_bound", "sync_seconds", "async_lowered_seconds" (the executable async plan's
    step as the executors run it, streamed — `as_executed` — None when not lowered) and
    "stream" (its graphrl.stream_cost.StreamChoice: the cut, head and tail; or None). Async is chosen only when its lowered plan — what the
    executors run — beats the synchronous one, not on the streamed price alone."""
    from graphrl.passes.staleness import carry_rollouts

    from .async_cost import async_lower_bound, async_pins, best_async, choose
    from .errors import UsageError

    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise UsageError(f"--staleness {staleness!r}: must be an int >= 0")
    rewritten = carry_rollouts(graph, staleness)   # refuses a step it cannot rewrite
    sync = compile_sync(graph, cluster, policy, placement=placement, **kw)
    problem = sync.problem
    plan = best_async(problem, staleness)
    bound = async_lower_bound(problem, staleness)
    sync_s = sync.plan.predicted_step_seconds
    chosen = choose(sync_s, plan) if not placement else 0
    notes = {"staleness": chosen, "async": plan, "async_bound": bound,
             "sync_seconds": sync_s, "sync_policy": policy, "async_lowered_seconds": None}
    if not chosen:
        return replace(sync, findings={**sync.findings, **notes})
    # the async graph's pipeline prices its streamed generation, searching the cut
    # (passes/price_stream.py), so its plan is the simulation of what the executors run
    out = compile_sync(rewritten, cluster, policy, placement=async_pins(rewritten, plan),
                       search_stream=True, **kw)
    notes["async_lowered_seconds"] = lowered = out.plan.predicted_step_seconds
    notes["stream"] = out.findings.get("stream")
    if lowered >= sync_s:   # what the executors would run is slower: stay synchronous
        notes["staleness"] = 0
        return replace(sync, findings={**sync.findings, **notes},
                       timings=sync.timings + out.timings)
    return replace(out, findings={**out.findings, **notes},
                   timings=sync.timings + out.timings)


def as_executed(out: Any, problem: Any, search: bool = True) -> Any:
    """The compiled plan `out` as the executors run it: its streamed generation priced
    into the graph (passes/price_stream.py) and lowered again, so its instructions run
    the head, the push, the tail and the early parts and its step is their simulation.
    `search`: choose the cut and which calls start early; else price the graph's own.
    Unchanged where generation does not stream."""
    from graphrl.passes.lower import lower
    from graphrl.passes.price_stream import price_stream

    from .verify import verify_plan

    graph, report = price_stream(out.graph, problem, out.plan.cluster, search)
    if report is None:
        return out
    plan = verify_plan(lower(graph, out.plan.cluster))
    return replace(out, graph=graph, plan=plan, stream=report, findings={
        **out.findings, "stream": report.choice, "stream_split": report.split})
