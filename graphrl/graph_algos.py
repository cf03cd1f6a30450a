"""Graph algorithms over the IR. The one module that uses networkx."""
from __future__ import annotations

import networkx as nx

from .graph import Graph


def dependency_graph(g: Graph) -> "nx.DiGraph":
    """Nodes are node names; an edge producer -> consumer for every data input."""
    dg = nx.DiGraph()
    producers = g.producers()
    for n in g.nodes:
        dg.add_node(n.name)
        for i in n.inputs:
            if i in producers:
                dg.add_edge(producers[i].name, n.name)
    return dg


def find_cycle(g: Graph) -> list[str] | None:
    """Node names along one dependency cycle, or None if the graph is acyclic."""
    try:
        edges = nx.find_cycle(dependency_graph(g))
    except nx.NetworkXNoCycle:
        return None
    return [u for u, _ in edges] + [edges[0][0]]


def ancestors(g: Graph, node: str) -> set[str]:
    return nx.ancestors(dependency_graph(g), node)


def topological_names(g: Graph) -> list[str]:
    """A deterministic topological order (ties broken by position in the graph)."""
    position = {n.name: i for i, n in enumerate(g.nodes)}
    return list(nx.lexicographical_topological_sort(dependency_graph(g), key=position.get))
