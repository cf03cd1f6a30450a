"""choose-overlap: which calls run in parallel, what is offloaded, whether to stream.

Rules (stated here, enforced by lower and checked by verify_plan):
- calls on disjoint meshes whose inputs are ready run at the same time; calls on GPUs
  they share run one after the other, in graph order;
- a parallel group `par=pK` names calls the predicted schedule runs at overlapping times
  on disjoint meshes;
- when the states of the models colocated on a GPU do not fit together with the largest
  call's working memory, each call there onloads its model's state before it runs and
  offloads it after (the search's choice, in the graph's schedule line: `offloaded`);
- micro-batch streaming of rollouts into downstream calls on other meshes is kept when
  the search found it shortens the step (the schedule line's `stream`, k micro-batches).

The groups follow from the nodes' timings (graphrl/schedule.py), which assign-devices
writes into the graph: this pass reads nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from graphrl.errors import GraphRLError
from graphrl.graph import Graph

from .context import PassContext


def parallel_groups(graph: Graph) -> dict[str, str]:
    """Node name -> group label for calls overlapping in time on disjoint meshes."""
    calls = [n for n in graph.nodes if n.placement is not None and n.timing is not None
             and n.timing.end > n.timing.start]
    position = {n.name: k for k, n in enumerate(graph.nodes)}
    parent = {n.name: n.name for n in calls}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, a in enumerate(calls):
        for b in calls[i + 1:]:
            ta, tb = a.timing, b.timing
            overlap = min(ta.end, tb.end) - max(ta.start, tb.start)
            if overlap > 1e-9 and not a.placement.mesh.overlaps(b.placement.mesh):
                parent[find(a.name)] = find(b.name)
    roots: dict[str, list[str]] = {}
    for n in calls:
        roots.setdefault(find(n.name), []).append(n.name)
    labels: dict[str, str] = {}
    order = sorted((members for members in roots.values() if len(members) > 1),
                   key=lambda m: min(position[n] for n in m))
    for k, members in enumerate(order):
        for n in members:
            labels[n] = f"p{k}"
    return labels


@dataclass(frozen=True)
class ChooseOverlap:
    name: str = "choose-overlap"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if graph.schedule is None:
            raise GraphRLError("choose-overlap needs a scheduled graph: run assign-devices "
                               "first")
        groups = parallel_groups(graph)
        return graph.with_nodes(replace(n, group=groups.get(n.name, "")) for n in graph.nodes)
