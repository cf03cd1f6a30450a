"""Lowering a placed graph read back from its text (`graphrl lower PLACED.txt`).

A placed graph's text (a numbered dump of insert-reshard, say) holds everything lower
needs (graphrl/schedule.py), so it lowers as it is. Its placements are also inputs:
the graph is first scheduled again from them — assign-devices keeps every placement it
states, choose-overlap and insert-reshard run as in a compile, under the options its
schedule line records — and when that gives back the same graph, the text is
untouched and lowers to the very plan the compile wrote (byte for byte). When it does
not, the text was edited (a mesh, a strategy, a timing): the plan is that of the
edited placement, scheduled and verified, and `changed` names the nodes whose
placement or timing the edit moved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cluster import ClusterSpec
from .errors import GraphRLError, UsageError
from .graph import Graph
from .plan import Plan

RESCHEDULE = "assign-devices,choose-overlap,insert-reshard,price-stream"


@dataclass(frozen=True)
class Lowered:
    plan: Plan
    graph: Graph                    # what was lowered
    changed: tuple[str, ...] = ()   # nodes an edit moved (empty: the text as compiled)


def context_for(graph: Graph, cluster: ClusterSpec) -> Any:
    """A PassContext with the compile options the graph's schedule line records."""
    from graphrl.passes.base import PassContext

    from .lengths import parse as parse_lengths

    s = graph.schedule
    return PassContext(cluster, gen_engine=s.gen_engine, headroom=s.headroom,
                       lengths=parse_lengths(s.lengths) if s.lengths else None)


def lower_placed(text: str, cluster: ClusterSpec | None = None, where: str = "<text>"
                 ) -> Lowered:
    """Parse a placed graph's text and lower it (see module doc). `cluster` defaults to
    the one its schedule line names; another one is refused."""
    from graphrl.passes.base import parse_pipeline, run_pipeline
    from graphrl.passes.lower import lower

    from .parser import parse_graph

    graph = parse_graph(text)
    if graph.schedule is None:
        raise UsageError(f"{where}: graph @{graph.name} has no schedule line: not a placed "
                         "graph (use a dump of assign-devices or a later pass: graphrl "
                         "compile --dump DIR)")
    placed_for = ClusterSpec.parse(graph.schedule.cluster)
    cluster = cluster or placed_for
    if cluster != placed_for:
        raise UsageError(f"{where} line {_line_of(text, 'schedule')}: graph @{graph.name} "
                         f"was placed for {graph.schedule.cluster}, not {cluster.text()}")
    unplaced = [n for n in graph.calls() if n.placement is None]
    if unplaced:
        n = unplaced[0]
        raise UsageError(f"{where} line {_line_of(text, n.name)}: {n.name} ({n.call}) has no "
                         "placement `@[GPUS]{strategy}`: every call of a placed graph has one")
    try:
        again = run_pipeline(graph, parse_pipeline(RESCHEDULE), context_for(graph, cluster))
    except GraphRLError as e:
        raise _at_line(e, text, graph, where) from None
    if again == graph:
        return Lowered(lower(graph, cluster), graph)
    old = {n.name: n for n in graph.nodes}
    changed = tuple(n.name for n in again.nodes if n.name not in old
                    or (old[n.name].placement, old[n.name].timing)
                    != (n.placement, n.timing))
    return Lowered(lower(again, cluster), again, changed)


def _line_of(text: str, name: str) -> int:
    """The 1-based line of node `name` (or the `schedule` line) in the text; 0 if none."""
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if name == "schedule" and s.startswith("schedule"):
            return i
        if s.startswith("%") and name in [v.strip() for v in s.split("=", 1)[0].split(",")]:
            return i
    return 0


def _at_line(e: GraphRLError, text: str, graph: Graph, where: str) -> UsageError:
    """The error as a UsageError prefixed with the line of the first node it names (by
    value name or call name), else with the file."""
    msg = str(e)
    for n in graph.nodes:
        if n.name in msg or n.call in msg:
            line = _line_of(text, n.name)
            if line:
                return UsageError(f"{where} line {line} ({n.name}): {msg}")
    return UsageError(f"{where}: {msg}")


__all__ = ["Lowered", "lower_placed", "context_for", "RESCHEDULE"]
