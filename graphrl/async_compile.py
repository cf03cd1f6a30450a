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
    out = compile_sync(rewritten, cluster, policy, placement=async_pins(rewritten, plan), **kw)
    out = as_executed(out, problem)
    notes["async_lowered_seconds"] = lowered = out.plan.predicted_step_seconds
    notes["stream"] = out.findings.get("stream")
    if lowered >= sync_s:   # what the executors would run is slower: stay synchronous
        notes["staleness"] = 0
        return replace(sync, findings={**sync.findings, **notes},
                       timings=sync.timings + out.timings)
    return replace(out, findings={**out.findings, **notes},
                   timings=sync.timings + out.timings)


def as_executed(out: Any, problem: Any, search: bool = True) -> Any:
    """The compiled async plan as the executors run it: its generate node streams
    (graphrl.stream_cost) and the plan is lowered again with what the stream's price
    needs written on the node — `stream_cut`, `head_seconds`, `tail_seconds` and, where
    calls start on the head part, `head_share` (graphrl/stream_train.py) — so its
    instructions run the head, the push, the tail and the early parts (passes/
    lower_stream.py) and its step is their simulation. `search`: choose the cut that
    makes the priced step shortest and unmark the calls whose early start does not pay;
    else price the graph's own cut and marks (compile_graph, for a graph rewritten
    before compiling: the cut decides which weights sample which tokens). Either way a
    call its engine or memory cannot split is unmarked. Unchanged where generation does
    not stream (a static-batch engine); a priced plan is priced again only to search."""
    from .async_cost import _gen_call
    from .stream_cost import best_stream, head_share, plan_sides, priced_stream
    from .stream_train import HEAD_PART, HEAD_SECONDS, split_report

    gen = _gen_call(problem)
    node = next((n for n in out.graph.nodes if n.name == gen.name), None) if gen else None
    if node is None or not node.attr("stream_cut"):
        return out
    if node.attr(HEAD_SECONDS) is not None:
        if not search:
            return out
        out = _unpriced(out, node.name)   # the search prices the plan with one call
        node = out.graph.node(node.name)
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
    if search:
        choice = best_stream(problem, gen, node.placement.strategy, train, push, split)
    else:
        cut = min(int(node.attr("stream_cut")), gen.new_tokens)
        choice = priced_stream(problem, gen, node.placement.strategy, cut, train, push, split)
    if choice is None:
        return out
    # the trains' head parts may cost more than they hide: try the forwards alone too
    forwards = tuple(m for m in marked if out.graph.node(m).target == "forward")
    if search and forwards and forwards != marked:
        alt = best_stream(problem, gen, node.placement.strategy, train, push,
                          _split_sides(out.plan, node, forwards, problem, gen))
        if alt.split is not None and alt.step_seconds < choice.step_seconds:
            whole.update({m: "" if out.graph.node(m).kind == "op" else
                          "starting it on the head part would not shorten the step here"
                          for m in marked if m not in forwards})
            marked, choice = forwards, alt
    if marked and choice.split is None:   # starting early does not pay: unmark
        whole.update({m: "starting it on the head part would not shorten the step here"
                      for m in marked})
    share = (head_share(problem, gen, choice.cut, int(node.attr("samples", 1)))
             if choice.split is not None else None)
    graph = _priced(out.graph, node.name, choice, share, whole)
    plan = _lowered(out, graph)
    report = split_report(graph, 1)   # for reports (compile_cli); the plan is the
    if report is not None and whole:  # graph's lowering alone, so its text lowers to it
        report = replace(report, refused=tuple((m, why) for m, why in whole.items() if why)
                         + report.refused)
    return replace(out, graph=graph, plan=plan, findings={
        **out.findings, "stream": choice, "stream_split": report})


def _priced(graph: Any, gen: str, choice: Any, share: float | None,
            whole: Mapping[str, str]) -> Any:
    """`graph` with generate node `gen` carrying the stream's price (as_executed) and
    the `whole` nodes unmarked (they wait for the whole batch)."""
    from .stream_train import HEAD_PART, HEAD_SECONDS, HEAD_SHARE, TAIL_SECONDS

    for name in [gen] + list(whole):
        n = graph.node(name)
        attrs = dict(n.attrs)
        if name == gen:
            attrs.update({"stream_cut": choice.cut, HEAD_SECONDS: choice.phases.head,
                          TAIL_SECONDS: choice.phases.tail})
            attrs.pop(HEAD_SHARE, None)
            if share:
                attrs[HEAD_SHARE] = share
        else:
            attrs.pop(HEAD_PART, None)
        graph = graph.replace_node(name, replace(n, attrs=tuple(sorted(attrs.items()))))
    return graph


def _unpriced(out: Any, gen: str) -> Any:
    """`out` with generate node `gen`'s stream price removed, lowered again (generation
    as one call, the push at the step's start)."""
    from .stream_train import HEAD_SECONDS, HEAD_SHARE, TAIL_SECONDS

    n = out.graph.node(gen)
    attrs = tuple(a for a in n.attrs if a[0] not in (HEAD_SECONDS, TAIL_SECONDS, HEAD_SHARE))
    graph = out.graph.replace_node(gen, replace(n, attrs=attrs))
    return replace(out, graph=graph, plan=_lowered(out, graph))


def _lowered(out: Any, graph: Any) -> Any:
    """The plan of `graph` (out's placed graph with new attributes), verified."""
    from graphrl.passes.lower import lower

    from .verify import verify_plan

    return verify_plan(lower(graph, out.plan.cluster))


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
