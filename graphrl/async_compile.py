"""compile_graph with `staleness` K >= 1: the synchronous plan, the best asynchronous
split (graphrl.async_cost), and whichever step is faster lowered as the plan."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from .cluster import ClusterSpec
from .graph import Graph


def compile_with_staleness(graph: Graph, cluster: ClusterSpec, policy: str, staleness: int,
                           *, placement: Mapping[str, Mapping[str, Any]] | None = None,
                           **kw: Any) -> Any:
    """The synchronous compile of `graph`, and, when async pays, the compile of its
    staleness-K rewrite pinned to the async plan's pools. `Compiled.findings` gains
    "staleness" (the chosen K, 0 = synchronous), "async" (the best AsyncPlan or None),
    "async_bound", "sync_seconds" and "async_lowered_seconds" (the executable async plan's
    step, None when not lowered). Async is chosen only when its lowered plan — what the
    executors run — beats the synchronous one, not on the streamed price alone."""
    from graphrl.passes.staleness import carry_rollouts

    from .async_cost import async_lower_bound, async_pins, best_async, choose
    from .compiler import compile_graph
    from .errors import UsageError

    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise UsageError(f"--staleness {staleness!r}: must be an int >= 0")
    rewritten = carry_rollouts(graph, staleness)   # refuses a step it cannot rewrite
    sync = compile_graph(graph, cluster, policy, placement=placement, **kw)
    problem = sync.findings["problem"]
    plan = best_async(problem, staleness)
    bound = async_lower_bound(problem, staleness)
    sync_s = sync.plan.predicted_step_seconds
    chosen = choose(sync_s, plan) if not placement else 0
    notes = {"staleness": chosen, "async": plan, "async_bound": bound,
             "sync_seconds": sync_s, "sync_policy": policy, "async_lowered_seconds": None}
    if not chosen:
        return replace(sync, findings={**sync.findings, **notes})
    out = compile_graph(rewritten, cluster, policy, placement=async_pins(rewritten, plan), **kw)
    notes["async_lowered_seconds"] = lowered = out.plan.predicted_step_seconds
    if lowered >= sync_s:   # the executors do not stream: what they run would be slower
        notes["staleness"] = 0
        return replace(sync, findings={**sync.findings, **notes},
                       timings=sync.timings + out.timings)
    return replace(out, findings={**out.findings, **notes},
                   timings=sync.timings + out.timings)
