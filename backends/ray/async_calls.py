"""The Ray executor's part of asynchronous steps (passes/staleness.py): the extra outputs
of a generate call marked `behaviour`."""
from __future__ import annotations

from typing import Any, Callable

from graphrl.graph import Graph, Node

from .specs import CallSpec, InputSpec


def behaviour_values(submit: Callable[..., tuple[Any, Any]], n: Node, graph: Graph,
                     token: Any, results: list[Any], bounds: list[tuple[int, int]],
                     ranks: list[int], common: dict[str, Any]
                     ) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Each rank scores the rows it generated with the same engine and weights (the
    behaviour log-probs: result refs and stamp refs, one per rank), and every sequence
    carries the version of those weights (a driver-side payload)."""
    import torch

    total = graph.value(n.outputs[0].name).spec.batch
    parts, stamps = [], []
    for rank, ref, (lo, hi) in zip(ranks, results, bounds):
        cs = CallSpec(inputs=(InputSpec(1, lo),), rows=(lo, hi), total=total,
                      **dict(common, method="forward", output=n.outputs[1].spec))
        r, s = submit(rank, "run", n, cs, ref)
        parts.append(r)
        stamps.append(s)
    version = {"version": torch.full((total,), token.version, dtype=torch.int64)}
    return parts, stamps, version
