"""compile_graph with `staleness` K >= 1: the synchronous plan, the best asynchronous
split (graphrl.async_cost) that can be placed, and whichever step is faster lowered as
the plan; graphrl.async_report.AsyncReport says what was found and why."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from .cluster import ClusterSpec
from .graph import Graph

LOWERED = 2   # placeable async candidates lowered at most (the fastest priced first)


def compile_with_staleness(graph: Graph, cluster: ClusterSpec, policy: str, staleness: int,
                           *, compile_sync: Callable[..., Any],
                           placement: Mapping[str, Mapping[str, Any]] | None = None,
                           **kw: Any) -> Any:
    """The synchronous compile of `graph`, and, when async pays, the compile of its
    staleness rewrite pinned to the best async plan's pools; `compile_sync` is the
    synchronous compiler (graphrl.compiler.compile_graph, which calls this one: passed in,
    so the two modules do not import each other). The async candidates
    (async_cost.async_candidates, fastest priced first) are lowered in turn, their
    streamed generation priced into the graph (passes/price_stream.py, the cut searched)
    so each plan's step is the simulation of what the executors run: one whose pools
    cannot be placed is skipped with its reason; of the first LOWERED that place, the
    fastest is the async plan, chosen only when it beats the synchronous one.
    `Compiled.findings` gains "async_report" (AsyncReport), "staleness" (the chosen K,
    0 = synchronous), "async" (the best placeable AsyncPlan or None), "async_bound" (the
    async lower bound), "sync_seconds", "async_lowered_seconds" and, where async was
    chosen, "stream" (its graphrl.stream_cost.StreamChoice) and "stream_split"."""
    from graphrl.passes.staleness import carry_rollouts

    from .async_cost import (MAX_STALENESS, _gen_call, async_candidates, async_lower_bound,
                             async_pins)
    from .async_report import AsyncReport, infeasible_why, why_lost
    from .errors import GraphRLError, UsageError

    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise UsageError(f"--staleness {staleness!r}: must be an int >= 0")
    if staleness > MAX_STALENESS:
        raise UsageError(f"--staleness {staleness}: the bound must be at most {MAX_STALENESS} "
                         "(rollouts that many steps old are far off-policy)")
    rewritten = carry_rollouts(graph, 1)   # refuses a step it cannot rewrite
    dumps = _Dumps(kw.pop("dump_dir", None))
    sync = compile_sync(graph, cluster, policy, placement=placement,
                        dump_dir=dumps.dir("sync"), **kw)
    problem = sync.problem
    sync_s = sync.plan.predicted_step_seconds
    plans, skipped = async_candidates(problem, staleness)
    bound = async_lower_bound(problem, 1)
    gen = _gen_call(problem)
    common = dict(bound=staleness, staleness=0, sync_seconds=sync_s,
                  lower_bound=bound, sync_generate_seconds=_generate_seconds(sync, gen))
    if placement:
        report = AsyncReport(plan=plans[0] if plans else None, lowered_seconds=None,
                             skipped=tuple(skipped), why="--placement pins the synchronous "
                             "plan's calls; async plans place generation on a pool of its own",
                             **common)
        return _with(dumps.publish("sync", sync), report, sync.timings)
    best, timings = None, list(sync.timings)   # (lowered step, plan, compiled)
    tried = 0
    for plan in plans:
        if tried == LOWERED or (best is not None and plan.step_seconds >= min(best[0], sync_s)):
            break   # enough lowered, or priced no faster than what it would have to beat
        try:
            out = compile_sync(rewritten, cluster, policy,
                               placement=async_pins(rewritten, plan), search_stream=True,
                               dump_dir=dumps.dir(f"async-{tried + 1}"), **kw)
        except GraphRLError as e:
            skipped.append((plan.pools, "not placed: " + str(e).splitlines()[0]))
            continue
        tried += 1
        timings += list(out.timings)
        lowered = out.plan.predicted_step_seconds
        if best is None or lowered < best[0]:
            best = (lowered, plan, out, f"async-{tried}")
    if best is None:
        why = infeasible_why(tuple(skipped), sum(c.phase == "generate" for c in problem.calls))
        report = AsyncReport(plan=None, lowered_seconds=None, skipped=tuple(skipped),
                             why=why, **common)
        return _with(dumps.publish("sync", sync), report, tuple(timings))
    lowered, plan, out, name = best
    n = cluster.num_gpus
    common.update(stream=out.findings.get("stream"),
                  stream_split=out.findings.get("stream_split"))
    if lowered >= sync_s:   # what the executors would run is slower: stay synchronous
        report = AsyncReport(plan=plan, lowered_seconds=lowered, skipped=tuple(skipped),
                             why=why_lost(plan, lowered, sync_s, n, common[
                                 "sync_generate_seconds"]), **common)
        return _with(dumps.publish("sync", sync), report, tuple(timings))
    report = AsyncReport(plan=plan, lowered_seconds=lowered, skipped=tuple(skipped),
                         **{**common, "staleness": plan.staleness})
    return _with(dumps.publish(name, out), report, tuple(timings))


class _Dumps:
    """Numbered pass dumps of an async compile: each compile (the synchronous one, each
    async candidate lowered) into a folder of its own under DIR (`sync/`, `async-1/`,
    ...), and the chosen plan's copied into DIR itself, next to the plan.json `graphrl
    compile --dump` writes: so DIR's last dump before lowering lowers to that plan."""

    def __init__(self, root: Any):
        from pathlib import Path

        self.root = Path(root) if root else None

    def dir(self, name: str) -> Any:
        return self.root / name if self.root is not None else None

    def publish(self, name: str, compiled: Any) -> Any:
        import shutil

        if self.root is not None:
            for f in sorted(self.dir(name).glob("[0-9][0-9][0-9]_*.txt")):
                shutil.copyfile(f, self.root / f.name)
        return compiled


def _with(base: Any, report: Any, timings: tuple) -> Any:
    """`base` with the report's findings (the keys earlier releases wrote too) and the
    compile timings. "stream" stays the synchronous plan's streaming degree where the
    plan is synchronous: the async plan's StreamChoice is the report's `stream`."""
    notes = {"async_report": report, "staleness": report.staleness, "async": report.plan,
             "async_bound": report.lower_bound, "sync_seconds": report.sync_seconds,
             "async_lowered_seconds": report.lowered_seconds,
             "stream_split": report.stream_split}
    if report.staleness:
        notes["stream"] = report.stream
    return replace(base, findings={**base.findings, **notes}, timings=tuple(timings))


def _generate_seconds(compiled: Any, gen: Any) -> float | None:
    """The synchronous plan's predicted seconds of generate call `gen`."""
    if gen is None:
        return None
    ev = compiled.evaluation
    s = next((s for s in getattr(ev, "schedule", ()) if s.name == gen.name), None)
    return s.choice.seconds if s is not None and s.choice is not None else None


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
