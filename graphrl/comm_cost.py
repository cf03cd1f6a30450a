"""Communication terms of the cost model: collectives (alpha-beta model, Hockney 1994;
ring algorithms, Patarasuk & Yuan 2009), tensor-parallel all-reduces, pipeline p2p and
data-parallel gradient synchronisation, and which link each group runs on.
"""
from __future__ import annotations

import math

from .cluster import GPUType
from .cost_params import (COLLECTIVE_STEP_LATENCY_S, DP_BUCKET_PARAMS,
                          DP_BUCKET_PARAMS_PER_RANK, GRAD_BYTES, NCCL_BW_FACTOR,
                          NCCL_LATENCY_S)
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


def nccl_allreduce_time(nbytes: float, n: int, bw: float, nodes: int = 1) -> float:
    """One NCCL all-reduce of an `nbytes` buffer over `n` ranks spread over `nodes` nodes,
    as NCCL's tuning model prices it (cost_params.NCCL_LATENCY_S): the fastest of
    - ring: base + (2(n-1) - 2(nodes-1)) NVLink hops + 2(nodes-1) network hops
      + 2(n-1)/n * M / BW (Patarasuk & Yuan 2009);
    - tree (double binary tree across nodes, a chain inside each): base
      + 2((n/nodes - 1) NVLink hops + log2(nodes) network hops) + 2 M / BW
      (Sanders, Speck & Traeff 2009; NCCL 2.4+);
    each with the LL protocol (small hop latency, a fifth of the bandwidth) or Simple.
    Latency dominates small messages at high degree: a ring's grows linearly with the
    ranks, a tree's with log2 of the nodes."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    nodes = max(1, min(nodes, n))
    best = math.inf
    for proto, factor in NCCL_BW_FACTOR.items():
        ring = _ring_time(2, proto, nbytes, n, bw * factor, nodes)
        base, intra, inter = NCCL_LATENCY_S[("tree", proto)]
        tree = (base + 2 * ((n / nodes - 1) * intra + math.log2(nodes) * inter)
                + 2 * nbytes / (bw * factor))
        best = min(best, ring, tree)
    return best


def nccl_allgather_time(nbytes: float, n: int, bw: float, nodes: int = 1) -> float:
    """One NCCL all-gather whose gathered result is `nbytes` (a reduce-scatter of an
    `nbytes` input costs the same): rings only, n-1 hops of which nodes-1 cross the
    network, (n-1)/n * M / BW; the faster protocol."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    nodes = max(1, min(nodes, n))
    best = math.inf
    for proto, factor in NCCL_BW_FACTOR.items():
        best = min(best, _ring_time(1, proto, nbytes, n, bw * factor, nodes))
    return best


def _ring_time(passes: int, proto: str, nbytes: float, n: int, bw: float, nodes: int) -> float:
    """`passes` trips around a ring of n ranks over `nodes` nodes (all-reduce: 2, all-gather:
    1): one base latency, per pass n - nodes NVLink hops and nodes - 1 network hops, and
    (n-1)/n of the message per pass at bandwidth `bw`."""
    base, intra, inter = NCCL_LATENCY_S[("ring", proto)]
    return (base + passes * ((n - nodes) * intra + (nodes - 1) * inter)
            + passes * (n - 1) / n * nbytes / bw)


def group_nodes(strategy: Strategy, gpus_per_node: int) -> tuple[int, int]:
    """(tp, dp) = how many nodes one tensor-parallel group and one data-parallel group
    span, with Megatron's rank order (tp fastest, then pp, then dp) on a mesh that starts
    on a node boundary: a tp group wider than a node spans ceil(tp / node) nodes, one
    that straddles a boundary 2; a dp group strides over the whole mesh, so it spans
    every node of it (at most dp)."""
    world = strategy.dp * strategy.tp * strategy.pp
    tp_nodes = 1
    if group_spans_nodes(strategy.tp, world, gpus_per_node):
        tp_nodes = max(2, math.ceil(strategy.tp / gpus_per_node))
    dp_nodes = min(strategy.dp, max(1, math.ceil(world / gpus_per_node)))
    return tp_nodes, dp_nodes


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
    intra, inter = gpu.intra_node_bw, gpu.inter_node_bw
    world = strategy.dp * strategy.tp * strategy.pp
    stage = strategy.tp * strategy.pp
    return (inter if group_spans_nodes(strategy.tp, world, gpus_per_node) else intra,
            inter if group_spans_nodes(stage, world, gpus_per_node) else intra,
            inter if strategy.dp > 1 and world > gpus_per_node else intra)


def _tp_comm(spec: ModelSpec, tokens: float, layers: float, collectives_per_layer: int,
             strategy: Strategy, bw: float, nodes: int = 1) -> float:
    """Megatron TP: 2 all-reduces of the [tokens, h] activations per layer in forward and 2
    in backward (Shoeybi et al. 2019 §3, Fig. 4; with sequence parallelism the all-gather
    + reduce-scatter pair moves the same bytes, Korthikanti et al. 2022 §4.2.2), each one
    NCCL call (nccl_allreduce_time: a decode step's all-reduces are small, so their
    latency is what they cost). `nodes`: nodes the group spans (group_nodes)."""
    nbytes = tokens * spec.hidden_size * DTYPE_BYTES[spec.dtype]
    return collectives_per_layer * layers * nccl_allreduce_time(nbytes, strategy.tp, bw, nodes)


def _pp_p2p(spec: ModelSpec, tokens: float, strategy: Strategy, bw: float) -> float:
    if strategy.pp == 1:
        return 0.0
    return reshard_time(tokens * spec.hidden_size * DTYPE_BYTES[spec.dtype], bw)


def _dp_grad_comm(spec: ModelSpec, strategy: Strategy, bw: float,
                  micro_batches: int = 1, nodes: int = 1) -> float:
    """Gradient synchronisation per optimizer step over the dp ranks (`nodes`: nodes one
    dp group spans, group_nodes), priced per NCCL call (nccl_allreduce_time), so that both
    the bandwidth term 2(d-1)/d of the buffer (Patarasuk & Yuan 2009) and the latency of
    each call, which grows with the degree, are paid.
    ZeRO-0/1: all-reduce of the bf16 (fp32: fp32) grads once per step, in buckets of
    max(40M, 1M x dp) parameters (Megatron-core DDP; cost_params.DP_BUCKET_PARAMS);
    ZeRO-2: reduce-scatter of grads + all-gather of updated weights (same volume and
    calls). ZeRO-3 (Rajbhandari et al. 2020 §7.2.2: 3x the volume of ZeRO-2, i.e. 1.5x an
    all-reduce) gathers each layer's weights before its forward and again before its
    backward and reduce-scatters its gradients after it: 3 calls per layer per micro-batch
    of gradient accumulation (DeepSpeed's stage 3 fetches parameters module by module and
    keeps no full copy between micro-batches)."""
    if strategy.dp == 1:
        return 0.0
    # the gradients in the model's precision: bf16 (GRAD_BYTES) in mixed precision, or fp32
    grad_bytes = GRAD_BYTES if spec.dtype == "bf16" else DTYPE_BYTES[spec.dtype]
    # LoRA (graphrl.lora): only the adapters have gradients to reduce
    params = spec.trained_params / (strategy.tp * strategy.pp)
    if strategy.zero == 3:
        layers = max(1.0, spec.num_layers / strategy.pp)
        if spec.lora is not None:   # the frozen base gathered for forward and backward
            per_layer = grad_bytes * spec.num_params / (strategy.tp * strategy.pp) / layers
            return (2 * layers * max(micro_batches, 1)
                    * nccl_allgather_time(per_layer, strategy.dp, bw, nodes)
                    + nccl_allreduce_time(grad_bytes * params, strategy.dp, bw, nodes))
        per_layer = grad_bytes * params / layers
        return (3 * layers * max(micro_batches, 1)
                * nccl_allgather_time(per_layer, strategy.dp, bw, nodes))
    bucket = max(DP_BUCKET_PARAMS, DP_BUCKET_PARAMS_PER_RANK * strategy.dp)
    full, rest = divmod(params, bucket)
    return (full * nccl_allreduce_time(grad_bytes * bucket, strategy.dp, bw, nodes)
            + nccl_allreduce_time(grad_bytes * rest, strategy.dp, bw, nodes))


def zero3_gather_time(spec: ModelSpec, strategy: Strategy, bw: float, nodes: int = 1) -> float:
    """A ZeRO-3 inference call gathers the weights once, layer by layer (one NCCL
    all-gather per layer, nccl_allgather_time)."""
    if strategy.dp == 1:
        return 0.0
    layers = max(1.0, spec.num_layers / strategy.pp)
    per_layer = spec.weight_bytes / (strategy.tp * strategy.pp) / layers
    return layers * nccl_allgather_time(per_layer, strategy.dp, bw, nodes)


def reshard_received_bytes(weight_bytes: float, train: Strategy, gen: Strategy,
                           colocated: bool) -> float:
    """Bytes one generation GPU receives when the trained weights move into the
    generation layout: its generation shard, 1/(t_g p_g) of the weights, less what it
    already holds. HybridFlow's grouping (Sheng et al. 2024 §5.4; reshard_plan.
    zero_redundancy_mesh) orders the generation ranks so that each GPU's generation shard
    contains its whole training shard (1/(t p) of the weights, a 1/dp slice of that
    under ZeRO-3) -- possible only when t_g divides t and p_g divides p. Otherwise the
    generation layout slices the weights differently (tp=2 x pp=4 training ->
    tp=8 generation: a GPU holds half the width of a quarter of the layers and needs an
    eighth of the width of every layer) and, in plain rank order, what a GPU holds is
    almost never inside what it needs: the exact transfer planner
    (passes/insert_reshard.plan_traffic) has it receive (nearly) its whole generation
    shard, and so does this."""
    shard = weight_bytes / (gen.tp * gen.pp)
    if not colocated or train.tp % gen.tp or train.pp % gen.pp:
        return shard
    held = weight_bytes / (train.tp * train.pp) / (train.dp if train.zero == 3 else 1)
    return max(0.0, shard - held)
