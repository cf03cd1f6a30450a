"""choose-overlap: which calls run in parallel, what is offloaded, whether to stream.

Rules (stated here, enforced by lower and checked by verify_plan):
- calls on disjoint meshes whose inputs are ready run at the same time; calls on GPUs
  they share run one after the other, in graph order;
- a parallel group `par=pK` names calls the predicted schedule runs at overlapping times
  on disjoint meshes;
- when the states of the models colocated on a GPU do not fit together with the largest
  call's working memory, each call there onloads its model's state before it runs and
  offloads it after (recorded for lower as `offload` findings);
- micro-batch streaming of rollouts into downstream calls on other meshes is kept when
  the search found it shortens the step (`stream` finding, k micro-batches).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from graphrl.errors import GraphRLError
from graphrl.graph import Graph

from .base import PassContext
from .search import Evaluation


def parallel_groups(ev: Evaluation) -> dict[str, str]:
    """Node name -> group label for calls overlapping in time on disjoint meshes."""
    calls = [s for s in ev.schedule if s.mesh is not None and s.end > s.start]
    parent = {s.name: s.name for s in calls}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, a in enumerate(calls):
        for b in calls[i + 1:]:
            overlap = min(a.end, b.end) - max(a.start, b.start)
            if overlap > 1e-9 and not a.mesh.overlaps(b.mesh):
                parent[find(a.name)] = find(b.name)
    roots: dict[str, list[str]] = {}
    for s in calls:
        roots.setdefault(find(s.name), []).append(s.name)
    labels: dict[str, str] = {}
    order = sorted((members for members in roots.values() if len(members) > 1),
                   key=lambda m: min(ev.schedule.index(next(s for s in ev.schedule
                                                             if s.name == n)) for n in m))
    for k, members in enumerate(order):
        for n in members:
            labels[n] = f"p{k}"
    return labels


@dataclass(frozen=True)
class ChooseOverlap:
    name: str = "choose-overlap"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        ev: Evaluation | None = ctx.findings.get("evaluation")
        if ev is None:
            raise GraphRLError("choose-overlap needs assign-devices to run first")
        groups = parallel_groups(ev)
        ctx.findings["offloaded_gpus"] = ev.offloaded_gpus
        ctx.findings["stream"] = ev.stream
        return graph.with_nodes(replace(n, group=groups.get(n.name, "")) for n in graph.nodes)
