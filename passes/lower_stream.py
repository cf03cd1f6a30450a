"""Lowering a streamed asynchronous step (graphrl/stream_train.py, backends/
stream_generation.py) as the executors run it, once the compiler priced its parts
(passes/price_stream.py writes them on the generate node):

    generation pool:  generate[head]  ----------------+ push +  generate[tail]
    training pool:    every call (a head_part call:   |      |  head_part calls[early]
                      its rest)  ---------------------+      +

- `head` (the node's `head_seconds`) runs where the search scheduled the generate call,
  beside the training pool's calls; a `head_part` call runs its rest there (part `rest`,
  1 - `head_share` of its seconds);
- the push (the reshard feeding generation its weights) is a gang over both pools, so
  it starts when the head and the training pool's work are done — the executors push
  the weights the step's train made (backends/ray/stream_calls.stream_tails);
- then `tail` (`tail_seconds`) on the generation pool beside the `head_part` calls'
  early parts (part `early`, `head_share` of their seconds, onloaded and offloaded
  again where their GPUs offload) on batch n's head-finished groups
  (backends/ray/head_parts.issue_head_parts). An op marked head_part runs on the host
  in its place, whole: its parts cost a host op's time.
The simulated step is then max(head, rest) + push + max(tail, early), the price of
graphrl/stream_cost.StreamPhases.step_split, from the instructions themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphrl.graph import Graph, Node
from graphrl.stream_train import HEAD_PART, HEAD_SECONDS, HEAD_SHARE, TAIL_SECONDS


@dataclass(frozen=True)
class StreamSplit:
    gen: str                    # the streamed generate node
    push: str | None            # the reshard node feeding it its weights
    head: float
    tail: float
    share: float                # the head part's share of a marked call's work
    marked: tuple[str, ...]     # head_part calls on GPUs


def stream_split(g: Graph) -> StreamSplit | None:
    """The priced stream of `g`'s one streamed generate node (None: none, or unpriced:
    generation is then lowered as one call)."""
    gens = [n for n in g.nodes if n.target == "generate" and n.attr("stream_cut")
            and n.attr(HEAD_SECONDS) is not None]
    if len(gens) != 1 or gens[0].placement is None:
        return None
    gen = gens[0]
    push = g.producers().get(gen.inputs[0])
    share = float(gen.attr(HEAD_SHARE, 0.0))
    marked = tuple(n.name for n in g.nodes if n.attr(HEAD_PART) and n.placement is not None
                   and n.kind == "call") if share > 0 else ()
    return StreamSplit(gen.name, push.name if push is not None and push.target == "reshard"
                       else None, float(gen.attr(HEAD_SECONDS)),
                       float(gen.attr(TAIL_SECONDS, 0.0)), share, marked)


def run_part(split: StreamSplit | None, n: Node, k: int, parts: int, seconds: float
             ) -> tuple[str, float]:
    """(part label, seconds) of part k of n's run where the search scheduled it."""
    if split is not None and n.name == split.gen:
        return "head", split.head
    if split is not None and n.name in split.marked:
        return "rest", seconds * (1.0 - split.share)
    return (f"{k + 1}/{parts}" if parts > 1 else ""), seconds / parts


def lower_stream_end(low: Any, split: StreamSplit) -> None:
    """After the step's other instructions (`low` is passes/lower._Lowering): the push,
    the tail and the marked calls' early parts (module doc)."""
    if split.push is not None:
        low.lower_reshard(low.g.node(split.push))
    sb, gen = low.sb, low.g.node(split.gen)
    head = _runs(low, split.gen)
    trains = tuple(i for n in low.g.nodes if n.target == "train"
                   for i in _runs(low, n.name)[:1])
    _, mem = low.cost(gen)
    for w in low.workers(gen):   # needs the step's train (the weights it runs with)
        sb.add(w, "run", node=gen.name, model=gen.model, label=gen.call, seconds=split.tail,
               mem=mem, deps=trains, part="tail")
    for name in split.marked:    # on batch n's head-finished groups, after its head
        n = low.g.node(name)
        seconds, mem = low.cost(n)
        moved = low.resident.get(low.unit(n), 0) / low.cluster.gpu.host_bw
        for w in low.workers(n):
            if w in low.offloaded:
                sb.add(w, "onload", model=n.model, node=n.name, seconds=moved,
                       label=f"onload {n.model}", part="early")
            sb.add(w, "run", node=n.name, model=n.model, label=n.call,
                   seconds=seconds * split.share, mem=mem, deps=head[:1], part="early")
            if w in low.offloaded:
                sb.add(w, "offload", model=n.model, node=n.name, seconds=moved,
                       label=f"offload {n.model}", part="early")


def _runs(low: Any, node: str) -> tuple[str, ...]:
    """Ids of the run instructions of `node` emitted so far."""
    return tuple(i.id for s in low.sb.streams.values() for i in s
                 if i.op == "run" and i.node == node)


__all__ = ["StreamSplit", "lower_stream_end", "run_part", "stream_split"]
