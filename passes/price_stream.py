"""price-stream: an asynchronous step's streamed generation, priced into the graph.

With `--staleness K` the generation pool streams each step's generate call in two parts
around the weight push (graphrl/stream_cost.py; backends/stream_generation.py): the
head up to `stream_cut` tokens per sequence beside the training pool's step, the push,
then the tail beside the training pool's calls that start early on the head part's
finished groups (graphrl/stream_train.py). This pass writes that price on the generate
node — `stream_cut`, `head_seconds`, `tail_seconds` and, where calls start on the head
part, `head_share` — and unmarks the calls that cannot or need not start early, so that
lower turns it into the head, push, tail and early instructions (passes/lower_stream.py)
and the plan's step is their simulation. The training pool's sides are measured on the
plan of the graph without the price (lowered here once).

`search=true` chooses the cut that makes the step shortest (and whether the trains'
head parts pay); `search=false` prices the graph's own cut and marks (a graph rewritten
before compiling, or a priced graph read back: pricing it again gives it back). A graph
whose generate call does not stream (no `stream_cut`) passes unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from graphrl.graph import Graph
from graphrl.stream_train import HEAD_PART, HEAD_SECONDS, HEAD_SHARE, TAIL_SECONDS
from graphrl.verify import verify_plan

from .context import PassContext

PRICE = (HEAD_SECONDS, TAIL_SECONDS, HEAD_SHARE)


@dataclass(frozen=True)
class StreamReport:
    """What pricing chose, for reports: the StreamChoice (cut, head, tail, step) and
    the head-part split report (which calls start early, which wait and why)."""

    choice: Any
    split: Any


def streamed_generate(graph: Graph) -> str | None:
    """The name of the graph's one generate node that streams (`stream_cut`), or None."""
    gens = [n for n in graph.nodes if n.target == "generate"]
    if len(gens) != 1 or not gens[0].attr("stream_cut"):
        return None
    return gens[0].name


def unpriced(graph: Graph, gen: str) -> Graph:
    """`graph` without the stream's price on generate node `gen` (lowered, generation
    runs as one call with the push at the step's start)."""
    n = graph.node(gen)
    return graph.replace_node(gen, replace(n, attrs=tuple(a for a in n.attrs
                                                          if a[0] not in PRICE)))


def price_stream(graph: Graph, problem: Any, cluster: Any, search: bool
                 ) -> tuple[Graph, StreamReport | None]:
    """The priced graph (see module doc) and its report; unchanged where it does not
    stream. `problem`: the step's placement problem (passes/search.py)."""
    from graphrl.stream_cost import best_stream, head_share, plan_sides, priced_stream
    from graphrl.stream_train import split_report

    from .lower import lower

    name = streamed_generate(graph)
    if name is None:
        return graph, None
    gen = problem.by_name[name]
    graph = unpriced(graph, name)
    plan = verify_plan(lower(graph, cluster))
    node = graph.node(name)
    train, push = plan_sides(plan, name)
    marked = tuple(n.name for n in graph.nodes if n.attr(HEAD_PART))
    # a DeepSpeed train takes its batch in one call (train_loop.TwoParts is the HF and
    # megatron-core engines'): it waits, and so do the ops that only fed it
    whole = {n.name: f"its engine ({n.placement.strategy.engine}) trains a batch in one call"
             for n in graph.nodes if n.name in marked and n.target == "train"
             and n.placement is not None and n.placement.strategy.engine == "deepspeed"}
    whole.update(no_room_for_gradient_copy(plan, marked, problem))
    if whole and not any(graph.node(m).target == "train" and m not in whole
                         for m in marked):
        whole.update({m: "" for m in marked if graph.node(m).kind == "op"})
    marked = tuple(m for m in marked if m not in whole)
    split = _split_sides(plan, node, marked, problem, gen) if marked else None
    if search:
        choice = best_stream(problem, gen, node.placement.strategy, train, push, split)
    else:
        cut = min(int(node.attr("stream_cut")), gen.new_tokens)
        choice = priced_stream(problem, gen, node.placement.strategy, cut, train, push, split)
    if choice is None:
        return graph, None
    # the trains' head parts may cost more than they hide: try the forwards alone too
    forwards = tuple(m for m in marked if graph.node(m).target == "forward")
    if search and forwards and forwards != marked:
        alt = best_stream(problem, gen, node.placement.strategy, train, push,
                          _split_sides(plan, node, forwards, problem, gen))
        if alt.split is not None and alt.step_seconds < choice.step_seconds:
            whole.update({m: "" if graph.node(m).kind == "op" else
                          "starting it on the head part would not shorten the step here"
                          for m in marked if m not in forwards})
            marked, choice = forwards, alt
    if marked and choice.split is None:   # starting early does not pay: unmark
        whole.update({m: "starting it on the head part would not shorten the step here"
                      for m in marked})
    share = (head_share(problem, gen, choice.cut, int(node.attr("samples", 1)))
             if choice.split is not None else None)
    graph = _priced(graph, name, choice, share, whole)
    report = split_report(graph, 1)
    if report is not None and whole:
        report = replace(report, refused=tuple((m, why) for m, why in whole.items() if why)
                         + report.refused)
    return graph, StreamReport(choice, report)


@dataclass(frozen=True)
class PriceStream:
    search: bool = False
    name: str = "price-stream"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if streamed_generate(graph) is None:
            return graph
        from .assign_devices import problem_from_graph

        graph, ctx.stream = price_stream(graph, problem_from_graph(graph, ctx), ctx.cluster,
                                         self.search)
        return graph


def _priced(graph: Any, gen: str, choice: Any, share: float | None,
            whole: Mapping[str, str]) -> Any:
    """`graph` with generate node `gen` carrying the stream's price and
    the `whole` nodes unmarked (they wait for the whole batch)."""
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


def no_room_for_gradient_copy(plan: Any, marked: tuple[str, ...], problem: Any
                               ) -> dict[str, str]:
    """Marked trains whose GPUs cannot also hold the copy of the head part's gradient a
    two-part train keeps until the rest arrives (train_loop.TwoParts: GRAD_BYTES per
    parameter of the rank's shard, sharded over dp from ZeRO-2 on) beside the call's peak
    and the other resident models, within the headroom: they take the batch in one call."""
    from graphrl.cost_params import GRAD_BYTES
    from graphrl.memory_track import memory_uses

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
        copy = (GRAD_BYTES * problem.specs[n.model].trained_params / (st.tp * st.pp)
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
    from graphrl.stream_cost import head_share, plan_sides

    samples = int(node.attr("samples", 1))

    def sides(cut: int) -> tuple[float, float]:
        a = head_share(problem, gen, cut, samples)
        early, _ = plan_sides(plan, node.name, {m: a for m in marked}, others=0.0)
        rest, _ = plan_sides(plan, node.name, {m: 1.0 - a for m in marked})
        return early, rest
    return sides


__all__ = ["PriceStream", "StreamReport", "price_stream", "streamed_generate", "unpriced",
           "no_room_for_gradient_copy"]
