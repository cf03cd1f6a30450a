"""Communication terms of the cost model: collectives (alpha-beta model, Hockney 1994;
ring algorithms, Patarasuk & Yuan 2009), tensor-parallel all-reduces, pipeline p2p and
data-parallel gradient synchronisation, and which link each group runs on.
"""
from __future__ import annotations

from .cluster import GPUType
from .cost_params import COLLECTIVE_STEP_LATENCY_S, GRAD_BYTES
from .parallel import Strategy
from .types import DTYPE_BYTES, ModelSpec


def allreduce_time(nbytes: float, n: int, bw: float,
                   latency: float = COLLECTIVE_STEP_LATENCY_S) -> float:
    """Ring all-reduce of an `nbytes` buffer over `n` ranks: reduce-scatter + all-gather,
    2(n-1)/n * M / BW plus 2(n-1) steps of latency (Patarasuk & Yuan 2009)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * latency


def allgather_time(nbytes: float, n: int, bw: float,
                   latency: float = COLLECTIVE_STEP_LATENCY_S) -> float:
    """Ring all-gather whose gathered result is `nbytes`: (n-1)/n * M / BW (+ latency).
    A reduce-scatter of an `nbytes` input costs the same."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / bw + (n - 1) * latency


reduce_scatter_time = allgather_time


def reshard_time(bytes_on_busiest_link: float, bw: float,
                 latency: float = COLLECTIVE_STEP_LATENCY_S) -> float:
    """A reshard is as slow as its busiest link: bytes on it / its bandwidth."""
    if bytes_on_busiest_link <= 0:
        return 0.0
    return bytes_on_busiest_link / bw + latency


def _bandwidths(strategy: Strategy, gpu: GPUType, gpus_per_node: int) -> tuple[float, float, float]:
    """(tp, pp, dp) group bandwidths with Megatron's rank order (tp fastest, then pp, then
    dp): a group stays on NVLink while it fits in a node."""
    def bw(span: int) -> float:
        return gpu.intra_node_bw if span <= gpus_per_node else gpu.inter_node_bw
    return (bw(strategy.tp), bw(strategy.tp * strategy.pp),
            bw(strategy.world))


def _tp_comm(spec: ModelSpec, tokens: float, layers: float, collectives_per_layer: int,
             strategy: Strategy, bw: float) -> float:
    """Megatron TP: 2 all-reduces of the [tokens, h] activations per layer in forward and 2
    in backward (Shoeybi et al. 2019 §3, Fig. 4; with sequence parallelism the all-gather
    + reduce-scatter pair moves the same bytes, Korthikanti et al. 2022 §4.2.2)."""
    nbytes = tokens * spec.hidden_size * DTYPE_BYTES[spec.dtype]
    return collectives_per_layer * layers * allreduce_time(nbytes, strategy.tp, bw)


def _pp_p2p(spec: ModelSpec, tokens: float, strategy: Strategy, bw: float) -> float:
    if strategy.pp == 1:
        return 0.0
    return reshard_time(tokens * spec.hidden_size * DTYPE_BYTES[spec.dtype], bw)


def _dp_grad_comm(spec: ModelSpec, strategy: Strategy, bw: float) -> float:
    """Gradient synchronisation per step. ZeRO-0/1: all-reduce of the bf16 grads; ZeRO-2:
    reduce-scatter of grads + all-gather of updated weights (same volume); ZeRO-3 adds a
    weight all-gather in forward and backward: 1.5x (Rajbhandari et al. 2020 §7)."""
    if strategy.dp == 1:
        return 0.0
    nbytes = GRAD_BYTES * spec.num_params / (strategy.tp * strategy.pp)
    base = allreduce_time(nbytes, strategy.dp, bw)
    return 1.5 * base if strategy.zero == 3 else base

