"""Candidate parallel strategies of one call on a mesh: the enumeration the placement
search (search.py) prices. Kept apart from the pricing and scheduling of placements."""
from __future__ import annotations

from typing import Iterable

from graphrl.parallel import Strategy
from graphrl.types import ModelSpec


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_strategies(spec: ModelSpec, phase: str, n: int, batch: int,
                         gpus_per_node: int, uneven: bool = False) -> Iterable[Strategy]:
    """Every dp x tp x pp = n split that divides the model; tp within a node (Megatron-LM
    keeps tensor parallelism on NVLink), micro-batches and ZeRO for train.

    dp must divide the batch unless `uneven` and the mesh is whole nodes (n > one node):
    then replicas get ceil or floor of batch/dp sequences and the last micro-batch is
    padded, priced at the slowest replica's ceil(batch/dp) (graphrl.compute_cost._split).
    Problem turns it on for clusters whose GPU count is not a power of two (12x8 = 96):
    there the whole cluster, and most node multiples, admit no even split of a
    power-of-two batch, and GPUs would sit idle. Within a node the search can always
    pick a mesh size that divides, and on power-of-two clusters every power-of-two mesh
    splits evenly (and the search stays within its compile-time budget)."""
    uneven = uneven and n > gpus_per_node
    for tp in divisors(n):
        if tp > gpus_per_node or spec.num_heads % tp or spec.num_kv_heads % tp and tp % spec.num_kv_heads:
            continue
        for pp in divisors(n // tp):
            dp = n // (tp * pp)
            if spec.num_layers % pp or dp > batch or (batch % dp and not uneven):
                continue
            if phase == "generate" and pp > 1:
                continue  # inference engines serve with tp (and dp replicas)
            per_replica = -(-batch // dp)
            mbs = [m for m in (1, 2, 4, 8, 16, 32)
                   if (per_replica % m == 0 or uneven) and m <= per_replica]
            if pp > 1:
                mbs = [m for m in mbs if m >= pp] or mbs[-1:]
            zeros = (0, 1, 2, 3) if phase == "train" and dp > 1 else (0,)
            # train may recompute activations, and also offload the optimizer
            memory = ((0, 0), (1, 0), (1, 1)) if phase == "train" else ((0, 0),)
            for mb in (mbs if phase == "train" or pp > 1 else [1]):
                for zero in zeros:
                    for recompute, offload in memory:
                        yield Strategy(dp, tp, pp, mb, zero, recompute, offload)


__all__ = ["divisors", "candidate_strategies"]
