"""compile_graph with `staleness` K >= 1: the synchronous plan, the best asynchronous
split (graphrl.async_cost) that can be placed, and whichever step is faster lowered as
the plan; graphrl.async_report.AsyncReport says what was found and why."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from .cluster import ClusterSpec
from .graph import Graph

LOWERED = 2   # placeable async candidates lowered at most (the fastest priced first)


def compile_with_staleness(graph: Graph, cluster: ClusterSpec, policy: str, staleness: int,
                           *, placement: Mapping[str, Mapping[str, Any]] | None = None,
                           **kw: Any) -> Any:
    """The synchronous compile of `graph`, and, when async pays, the compile of its
    staleness rewrite pinned to the best async plan's pools. The async candidates
    (async_cost.async_candidates, fastest priced first) are lowered in turn: one whose
    pools cannot be placed is skipped with its reason; of the first LOWERED that place,
    the fastest as executed (`as_executed`) is the async plan, chosen only when it beats
    the synchronous one. `Compiled.findings` gains "async_report" (AsyncReport),
    "staleness" (the chosen K, 0 = synchronous), "async" (the best placeable AsyncPlan or
    None), "async_bound" (the async lower bound), "sync_seconds",
    "async_lowered_seconds" and, where async was lowered, "stream" (its
    graphrl.stream_cost.StreamChoice) and "stream_split"."""
    from graphrl.passes.staleness import carry_rollouts

    from .async_cost import (MAX_STALENESS, _gen_call, async_candidates, async_lower_bound,
                             async_pins)
    from .async_report import AsyncReport, infeasible_why, why_lost
    from .compiler import compile_graph
    from .errors import GraphRLError, UsageError

    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise UsageError(f"--staleness {staleness!r}: must be an int >= 0")
    if staleness > MAX_STALENESS:
        raise UsageError(f"--staleness {staleness}: the bound must be at most {MAX_STALENESS} "
                         "(rollouts that many steps old are far off-policy)")
    rewritten = carry_rollouts(graph, 1)   # refuses a step it cannot rewrite
    sync = compile_graph(graph, cluster, policy, placement=placement, **kw)
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
        return _with(sync, report, sync.timings)
    best, timings = None, list(sync.timings)   # (lowered step, plan, compiled)
    tried = 0
    for plan in plans:
        if tried == LOWERED or (best is not None and plan.step_seconds >= min(best[0], sync_s)):
            break   # enough lowered, or priced no faster than what it would have to beat
        try:
            out = compile_graph(rewritten, cluster, policy,
                                placement=async_pins(rewritten, plan), **kw)
        except GraphRLError as e:
            skipped.append((plan.pools, "not placed: " + str(e).splitlines()[0]))
            continue
        tried += 1
        timings += list(out.timings)
        out = as_executed(out, problem)
        lowered = out.plan.predicted_step_seconds
        if best is None or lowered < best[0]:
            best = (lowered, plan, out)
    if best is None:
        why = infeasible_why(tuple(skipped), sum(c.phase == "generate" for c in problem.calls))
        report = AsyncReport(plan=None, lowered_seconds=None, skipped=tuple(skipped),
                             why=why, **common)
        return _with(sync, report, tuple(timings))
    lowered, plan, out = best
    n = cluster.num_gpus
    common.update(stream=out.findings.get("stream"),
                  stream_split=out.findings.get("stream_split"))
    if lowered >= sync_s:   # what the executors would run is slower: stay synchronous
        report = AsyncReport(plan=plan, lowered_seconds=lowered, skipped=tuple(skipped),
                             why=why_lost(plan, lowered, sync_s, n, common[
                                 "sync_generate_seconds"]), **common)
        return _with(sync, report, tuple(timings))
    report = AsyncReport(plan=plan, lowered_seconds=lowered, skipped=tuple(skipped),
                         **{**common, "staleness": plan.staleness})
    return _with(out, report, tuple(timings))


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


def as_executed(out: Any, problem: Any) -> Any:
    """The compiled async plan priced as the executors run it: its generate node streams
    (graphrl.stream_cost) with the cut that makes the step shortest, which the node's
    `stream_cut` now holds; the plan's step is max(head, training pool) + push + tail.
    Its timeline still draws generation as one call at its whole-batch price. Unchanged
    where generation does not stream (a static-batch engine)."""
    from .async_cost import _gen_call
    from .stream_cost import best_stream, plan_sides
    from .stream_train import HEAD_PART, split_report

    gen = _gen_call(problem)
    node = next((n for n in out.graph.nodes if n.name == gen.name), None) if gen else None
    if node is None or not node.attr("stream_cut"):
        return out
    train, push = plan_sides(out.plan, node.name)
    marked = tuple(n.name for n in out.graph.nodes if n.attr(HEAD_PART))
    # a DeepSpeed train takes its batch in one call (train_loop.TwoParts is the HF and
    # megatron-core engines'): it waits, and so do the ops that only fed it
    whole = {n.name: f"its engine ({n.placement.strategy.engine}) trains a batch in one call"
             for n in out.graph.nodes if n.name in marked and n.target == "train"
             and n.placement is not None and n.placement.strategy.engine == "deepspeed"}
    whole.update(_no_room_for_gradient_copy(out.plan, marked, problem))
    if whole and not any(out.graph.node(m).target == "train" and m not in whole
                         for m in marked):
        whole.update({m: "" for m in marked if out.graph.node(m).kind == "op"})
    marked = tuple(m for m in marked if m not in whole)
    split = _split_sides(out.plan, node, marked, problem, gen) if marked else None
    choice = best_stream(problem, gen, node.placement.strategy, train, push, split)
    if choice is None:
        return out
    # the trains' head parts may cost more than they hide: try the forwards alone too
    forwards = tuple(m for m in marked if out.graph.node(m).target == "forward")
    if forwards and forwards != marked:
        alt = best_stream(problem, gen, node.placement.strategy, train, push,
                          _split_sides(out.plan, node, forwards, problem, gen))
        if alt.split is not None and alt.step_seconds < choice.step_seconds:
            whole.update({m: "" if out.graph.node(m).kind == "op" else
                          "starting it on the head part would not shorten the step here"
                          for m in marked if m not in forwards})
            marked, choice = forwards, alt
    report = split_report(out.graph, 1)
    notes = list(out.plan.notes)
    if marked and choice.split is None:   # starting early does not pay: unmark
        whole.update({m: "starting it on the head part would not shorten the step here"
                      for m in marked})
    if report is not None and whole:
        report = replace(report, calls=tuple(c for c in report.calls if c not in whole),
                         refused=tuple((m, why) for m, why in whole.items() if why)
                         + report.refused)
    graph, pgraph = out.graph, out.plan.graph
    for g_name in [node.name] + list(whole):
        def edit(g: Any) -> Any:
            n = g.node(g_name)
            attrs = dict(n.attrs)
            if g_name == node.name:
                attrs["stream_cut"] = choice.cut
            else:
                attrs.pop(HEAD_PART, None)
            return g.replace_node(g_name, replace(n, attrs=tuple(sorted(attrs.items()))))
        graph, pgraph = edit(graph), edit(pgraph)
    if report is not None:
        notes += [("stream", line) for line in report.lines()]
    plan = replace(out.plan, graph=pgraph, predicted_step_seconds=choice.step_seconds,
                   notes=tuple(notes))
    return replace(out, graph=graph, plan=plan, findings={
        **out.findings, "stream": choice, "stream_split": report})


def _no_room_for_gradient_copy(plan: Any, marked: tuple[str, ...], problem: Any
                               ) -> dict[str, str]:
    """Marked trains whose GPUs cannot also hold the copy of the head part's gradient a
    two-part train keeps until the rest arrives (train_loop.TwoParts: GRAD_BYTES per
    parameter of the rank's shard, sharded over dp from ZeRO-2 on) beside the call's peak
    and the other resident models, within the headroom: they take the batch in one call."""
    from .cost_params import GRAD_BYTES
    from .memory_track import memory_uses

    trains = {n.name: n for n in plan.graph.nodes if n.name in marked and n.target == "train"
              and n.placement is not None}
    if not trains:
        return {}
    peak: dict[str, int] = {}
    for use in memory_uses(plan):
        if use.instr.op == "run" and use.instr.node in trains:
            peak[use.instr.node] = max(peak.get(use.instr.node, 0), use.in_use)
    refused = {}
    for name, n in trains.items():
        st = n.placement.strategy
        copy = (GRAD_BYTES * problem.specs[n.model].num_params / (st.tp * st.pp)
                / (st.dp if st.zero >= 2 else 1))
        if peak.get(name, 0) + copy > problem.capacity:
            refused[name] = (f"its GPUs cannot also hold the head part's gradient copy "
                             f"({copy / 2**30:.1f} GiB beside {peak.get(name, 0) / 2**30:.1f} "
                             f"GiB in use; {problem.capacity / 2**30:.1f} GiB usable)")
    return refused


def _split_sides(plan: Any, node: Any, marked: tuple[str, ...], problem: Any, gen: Any
                 ) -> Any:
    """cut -> (early, rest): the training pool's seconds on the head part of batch n
    (the marked calls, at the head part's share of the tokens) and on the rest of its
    step (graphrl/stream_train.py)."""
    from .stream_cost import head_share, plan_sides

    samples = int(node.attr("samples", 1))

    def sides(cut: int) -> tuple[float, float]:
        a = head_share(problem, gen, cut, samples)
        early, _ = plan_sides(plan, node.name, {m: a for m in marked}, others=0.0)
        rest, _ = plan_sides(plan, node.name, {m: 1.0 - a for m in marked})
        return early, rest
    return sides
