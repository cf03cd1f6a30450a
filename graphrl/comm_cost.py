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


def group_spans_nodes(size: int, world: int, gpus_per_node: int) -> bool:
    """Whether some group of `size` consecutive ranks of a `world`-GPU mesh crosses a node
    boundary, the mesh starting on a node boundary (as every mesh of more than one node
    the search builds does; graphrl.cluster numbers GPUs node-major). Groups tile the
    mesh from rank 0, so one crosses exactly when it is wider than a node, or when the
    mesh spans nodes and `size` does not divide the node's GPU count: tp=6 over GPUs 0-47
    of 8-GPU nodes puts GPUs 6-11 (nodes 0 and 1) in one group."""
    if size <= 1:
        return False
    if size > gpus_per_node:
        return True
    return world > gpus_per_node and gpus_per_node % size != 0


def _bandwidths(strategy: Strategy, gpu: GPUType, gpus_per_node: int) -> tuple[float, float, float]:
    """(tp, pp, dp) group bandwidths with Megatron's rank order (tp fastest, then pp, then
    dp): a group runs at NVLink speed only while every group of its kind stays inside a
    node; one that spans nodes is a ring through the nodes' NICs, so it runs at the
    inter-node bandwidth (NCCL rings are as slow as their slowest link; Patarasuk & Yuan
    2009), and a synchronous step waits for its slowest group."""
    def bw(size: int) -> float:
        if group_spans_nodes(size, strategy.world, gpus_per_node):
            return gpu.inter_node_bw
        return gpu.intra_node_bw
    dp_spans = strategy.dp > 1 and strategy.world > gpus_per_node
    return (bw(strategy.tp), bw(strategy.tp * strategy.pp),
            gpu.inter_node_bw if dp_spans else gpu.intra_node_bw)


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


def _dp_grad_comm(spec: ModelSpec, strategy: Strategy, bw: float,
                  micro_batches: int = 1) -> float:
    """Gradient synchronisation per optimizer step, a ring over the dp ranks whose time
    grows with the degree: 2(d-1)/d of the buffer per GPU plus 2(d-1) latency steps
    (Patarasuk & Yuan 2009), at the inter-node bandwidth once the group spans nodes.
    ZeRO-0/1: all-reduce of the bf16 grads once per step; ZeRO-2: reduce-scatter of grads
    + all-gather of updated weights (same volume). ZeRO-3 (Rajbhandari et al. 2020 §7.2.2:
    3x the volume of ZeRO-2, i.e. 1.5x an all-reduce) gathers the weights before every
    forward and backward and reduce-scatters the gradients after it, so it pays that
    volume once per micro-batch of gradient accumulation (DeepSpeed's stage 3 re-gathers
    partitioned parameters for each micro-batch; it keeps no full copy between them)."""
    if strategy.dp == 1:
        return 0.0
    nbytes = GRAD_BYTES * spec.num_params / (strategy.tp * strategy.pp)
    base = allreduce_time(nbytes, strategy.dp, bw)
    return 1.5 * base * max(micro_batches, 1) if strategy.zero == 3 else base

