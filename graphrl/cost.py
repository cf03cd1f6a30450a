"""Analytic cost model: seconds and peak memory per GPU of one model call.

Phases: `forward` (a log-prob / value / reward pass, no grad), `train` (forward + backward
+ optimizer step) and `generate` (prefill + autoregressive decode with a KV cache).
Everything is arithmetic over `ModelSpec`, `Strategy` and `GPUType`; nothing here imports
torch. Each formula cites where it comes from; the efficiency factors and host-overhead
floors are fitted to real H100 measurements by `graphrl.calibrate` (see FITTED_* below).

Conventions: `batch` is the call's global batch (sequences), split over `dp` replicas and
then into `micro_batches`; `tp` splits every matmul (Megatron-LM, Shoeybi et al. 2019),
`pp` splits the layers into stages. Times are seconds, memory is bytes per GPU.

Shape of the time model (one pipeline stage, one micro-batch):
    host   = per-call + per-layer launch overhead (Python/kernel launches of an eager
             framework; what dominates small calls and Hugging Face decode)
    device = FLOPs / (peak * matmul_eff) + fixed work per token per layer / peak
             + weight bytes read from HBM / (bandwidth * hbm_eff) + TP collectives
             (so the achieved FLOP rate rises with the tokens per GPU: matmul_efficiency)
    time   = smooth_max(host, device): host and device overlap (CUDA launches are
             asynchronous), a p-norm between "add" (p = 1) and "max" (p -> inf).
The device term is a roofline (Williams et al. 2009, CACM 52(4)) written as a sum of the
compute and memory times so that it is smooth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Mapping

from .cluster import GiB, GPUType, H100_80G
from .parallel import Strategy
from .types import DTYPE_BYTES, ModelSpec

PHASES = ("forward", "train", "generate")
ENGINES = ("hf", "graph")
# The "graph" class is graphrl's fast engine (backends/engines/fast.py: static KV cache,
# continuous batching, a CUDA graph per batch bucket): a model declared engine="fast"
# generates in it; every other engine generates like Hugging Face eager code ("hf").
GENERATION_CLASS = {"fast": "graph"}
# The fast engine measured eagerly on CPU (no CUDA graphs there; 1 thread, shared 2-core
# machine, benchmarks/generation.py and docs/generation.md): seconds per decode step =
# call + layers * layer, against the HF engine's loop measured alongside (1.29 ms, 0.87 ms).
# Its GPU constants are the "graph" terms below until a GPU measurement replaces them.
FAST_ENGINE_CPU = {"call_s": 1.43e-3, "layer_s": 0.74e-3}


def generation_class(engine: str) -> str:
    """The cost class ("hf" or "graph") of generation on a model declared with `engine`."""
    return GENERATION_CLASS.get(engine, "hf")

# ---------------------------------------------------------------------------------------
# Constants taken from the literature (not fitted)
# ---------------------------------------------------------------------------------------
# Mixed-precision Adam: 2 (fp16/bf16 weights) + 2 (grads) + 12 (fp32 master, momentum,
# variance) bytes per parameter; ZeRO stage 1/2/3 shards 12/14/16 of them over dp
# (Rajbhandari et al. 2020, "ZeRO", §3.1 and §5).
ADAM_BYTES_PER_PARAM = 16
ZERO_SHARDED_BYTES: Mapping[int, int] = MappingProxyType({0: 0, 1: 12, 2: 14, 3: 16})
# Bytes of HBM traffic per parameter of one fused Adam step: read fp32 weight, grad, m, v
# (16 B) and write weight, m, v (12 B) (Kingma & Ba 2015 update rule; one pass each).
OPTIMIZER_TRAFFIC_BYTES_PER_PARAM = 28
# Gradients are reduced across data parallel ranks in bf16 (Megatron-LM / DeepSpeed
# mixed precision, Micikevicius et al. 2018).
GRAD_BYTES = 2
# Activation memory per layer s*b*h*(34 + 5*a*s/h) bytes (Korthikanti et al. 2022,
# "Reducing Activation Recomputation in Large Transformer Models", eq. (1)); the 5*a*s/h
# term is the attention score matrix, which flash attention (Dao et al. 2022) never
# stores: we drop it unless `flash_attention=False`.
KORTHIKANTI_ACT_BYTES = 34
KORTHIKANTI_SCORE_BYTES = 5
# ZeRO-Offload (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model
# Training", §4): the fp32 master weights, momentum and variance (12 B/param) live in host
# memory, bf16 gradients go down and bf16 weights come back over PCIe each step, and the
# Adam update runs on the CPU. Their CPU-Adam updates about a billion parameters in
# ~0.2-0.5 s on a two-socket host (§6, Table 3 order of magnitude): we take 3e9
# params/s per node, shared by the node's GPUs.
OFFLOAD_HOST_BYTES_PER_PARAM = 12
CPU_ADAM_PARAMS_PER_S_PER_NODE = 3e9
# Full activation recomputation keeps each layer's bf16 input (2 B per hidden per token)
# and recomputes the layer in backward: one more forward (Chen et al. 2016; Korthikanti
# et al. 2022 §5, Table 2 "full recompute": 2sbh per layer).
RECOMPUTE_ACT_BYTES = 2
# Latency of one step of a ring / tree collective (NCCL small-message latency is a few
# microseconds per hop on NVLink; Thakur, Rabenseifner & Gropp 2005 alpha-beta model).
COLLECTIVE_STEP_LATENCY_S = 2e-6

# ---------------------------------------------------------------------------------------
# Fitted constants. Obtained by `graphrl.calibrate.fit`: least squares over
# log(predicted / measured) (plus a small L4 term for the worst points) on every `run`
# record of shared/calibration/h100_hf_llama.jsonl (one H100 80GB, HF transformers eager,
# SDPA), by a coordinate search from `calibrate.FIT_START`; the time constants on the run
# times, then the memory constants on the peak memory of the train / generate / forward
# runs; matmul_eff is capped by the measured matmul ceiling (741 TFLOP/s), hbm_eff is the
# measured copy bandwidth. Refit (prints these lines and a predicted-vs-measured table,
# then the held-out points of benchmarks/h100_check.py: 1B-7B, 4k tokens, never fitted):
#     python -m graphrl.calibrate ../shared/calibration/h100_hf_llama.jsonl \
#         benchmarks/data/h100_decode.jsonl --check benchmarks/data/h100_heldout.jsonl
# Efficiencies are fractions of the datasheet figures of `GPUType`, so they carry over to
# other GPU kinds; host overheads are seconds (an eager PyTorch host of the H100 era).
# ---------------------------------------------------------------------------------------
FITTED_MATMUL_EFF = 0.4893         # bf16 matmuls: fraction of datasheet peak (484 TFLOP/s)
FITTED_HBM_EFF = 0.8454            # hw record: 2832 GB/s measured copy / 3350 datasheet
FITTED_TOKEN_LAYER_FLOPS = 5.384e7  # device work per token per layer beyond 2N (FLOP-equiv.;
                                    # 54 ns on an H100)
FITTED_HOST_CALL_S = 0.4846e-3     # eager model call: embedding, masks, head, Python
FITTED_HOST_LAYER_S = 0.7894e-3    # eager model call: per decoder layer (README: ~0.75 ms)
FITTED_OVERLAP_EXP = 1.808         # p of the host/device p-norm
FITTED_TRAIN_HOST_LAYER_S = 3.044e-3  # train step: per layer, forward + backward + optimizer
FITTED_BWD_EFF_RATIO = 0.8937      # backward matmul efficiency relative to forward
FITTED_ACT_MEM_BYTES = 50.35       # train activations, bytes per token per hidden per layer
                                   # (Korthikanti's 34 for fp16; HF autocast keeps fp32 copies)
FITTED_LOGIT_TRAIN_BYTES = 12.89   # train: bytes per logit (bf16 + fp32 loss copies + grads)
FITTED_LOGIT_FWD_BYTES = 2.0       # forward peak: bytes per logit (the bf16 logits)
FITTED_FWD_TRANSIENT_BYTES = 16.63  # inference peak: transient bytes per token per hidden
# Decode step of a CUDA-graph-captured engine, fitted on the `decode` records of
# benchmarks/data/h100_decode.jsonl (one H100; `python benchmarks/h100_check.py --measure`):
# step = slowdown * (weights + KV cache) / HBM bandwidth + a floor per layer (a captured
# graph still runs ~20 small kernels a layer back to back; Pope et al. 2022 §2 for the
# bandwidth bound). Measured: 1.2-3.4x the bound, the floor dominating small steps; the
# fit is within 8% of all nine steps (1B and 7B Llama, batch 1-256, context 512-4096).
FITTED_DECODE_BW_SLOWDOWN = 1.028  # decode kernels: time over the HBM-bandwidth bound
FITTED_GRAPH_LAYER_S = 0.0999e-3   # captured decode step: seconds per layer


@dataclass(frozen=True)
class CostParams:
    """The fitted constants of the model, as one value so that a fit can try others."""

    matmul_eff: float = FITTED_MATMUL_EFF
    hbm_eff: float = FITTED_HBM_EFF
    token_layer_flops: float = FITTED_TOKEN_LAYER_FLOPS
    host_call_s: float = FITTED_HOST_CALL_S
    host_layer_s: float = FITTED_HOST_LAYER_S
    overlap_exp: float = FITTED_OVERLAP_EXP
    train_host_layer_s: float = FITTED_TRAIN_HOST_LAYER_S
    bwd_eff_ratio: float = FITTED_BWD_EFF_RATIO
    act_mem_bytes: float = FITTED_ACT_MEM_BYTES
    logit_train_bytes: float = FITTED_LOGIT_TRAIN_BYTES
    logit_fwd_bytes: float = FITTED_LOGIT_FWD_BYTES
    fwd_transient_bytes: float = FITTED_FWD_TRANSIENT_BYTES
    decode_bw_slowdown: float = FITTED_DECODE_BW_SLOWDOWN
    graph_layer_s: float = FITTED_GRAPH_LAYER_S

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) >= 0:
                raise ValueError(f"cost parameter {f.name} must be >= 0")
        if self.overlap_exp < 1:
            raise ValueError("overlap_exp must be >= 1")

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_values(self, values: Mapping[str, float]) -> "CostParams":
        return replace(self, **values)


CALIBRATED = CostParams()


@dataclass(frozen=True)
class CallCost:
    """Predicted cost of one call: seconds, peak bytes per GPU, and named components.

    `breakdown` holds the terms before host/device overlap is applied, so they need not
    add up to `seconds`.
    """

    seconds: float
    peak_memory_bytes: int
    breakdown: tuple[tuple[str, float], ...] = ()

    @property
    def peak_memory_gib(self) -> float:
        return self.peak_memory_bytes / GiB

    def fits(self, gpu: GPUType) -> bool:
        return self.peak_memory_bytes <= gpu.memory_bytes

    def as_dict(self) -> dict[str, object]:
        return {"seconds": self.seconds, "peak_memory_bytes": self.peak_memory_bytes,
                "peak_memory_gib": self.peak_memory_gib, "breakdown": dict(self.breakdown)}


# ---------------------------------------------------------------------------------------
# Communication (alpha-beta model, Hockney 1994; ring algorithms, Patarasuk & Yuan 2009)
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# FLOPs and bytes of a model
# ---------------------------------------------------------------------------------------
def _head_width(spec: ModelSpec) -> int:
    return spec.vocab_size if spec.head == "lm" else 1


def matmul_params(spec: ModelSpec) -> int:
    """Parameters that take part in matmuls: the layers and the head (the embedding lookup
    is a gather; Kaplan et al. 2020 §2.1 likewise count non-embedding parameters)."""
    return spec.num_layers * spec.params_per_layer + spec.hidden_size * _head_width(spec)


def attention_flops(spec: ModelSpec, batch: int, q_len: int, kv_len: int) -> float:
    """QK^T and attention-times-V: 2 * 2 * b * q * kv * (heads * head_dim) per layer
    (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
    Using Megatron-LM", §5.1: the 4bs^2h term of the forward pass)."""
    return 4.0 * batch * q_len * kv_len * spec.num_heads * spec.head_dim * spec.num_layers


def forward_flops(spec: ModelSpec, batch: int, seq: int) -> float:
    """2 FLOPs per matmul parameter per token (Kaplan et al. 2020, Table 1: C_forward ~ 2N)
    plus causal attention over the sequence (counted in full, as Narayanan et al. do)."""
    return 2.0 * matmul_params(spec) * batch * seq + attention_flops(spec, batch, seq, seq)


def train_flops(spec: ModelSpec, batch: int, seq: int) -> float:
    """Forward + backward = 3x forward: 6N per token + attention (Kaplan et al. 2020 §2.1;
    Narayanan et al. 2021 eq. (3) without recomputation)."""
    return 3.0 * forward_flops(spec, batch, seq)


def kv_cache_bytes(spec: ModelSpec, batch: int, tokens: int, tp: int = 1, pp: int = 1) -> float:
    """K and V for every layer: 2 * L * n_kv * d_head * bytes * batch * tokens; per GPU the
    layers split over pp and the KV heads over tp (replicated once tp exceeds them, as
    vLLM does for GQA models)."""
    heads_per_gpu = max(spec.num_kv_heads / tp, 1.0)
    return (2.0 * spec.num_layers / pp * heads_per_gpu * spec.head_dim
            * DTYPE_BYTES[spec.dtype] * batch * tokens)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def smooth_max(a: float, b: float, p: float) -> float:
    """(a^p + b^p)^(1/p): a + b at p = 1, max(a, b) as p -> inf."""
    hi = max(a, b)
    if hi <= 0:
        return 0.0
    return hi * ((a / hi) ** p + (b / hi) ** p) ** (1.0 / p)


def matmul_efficiency(spec: ModelSpec, tokens: int, gpu: GPUType = H100_80G,
                      params: CostParams = CALIBRATED, tp: int = 1) -> float:
    """Fraction of peak FLOP/s a forward over `tokens` tokens per GPU reaches (model FLOPs
    utilisation of the device time). It rises with the tokens per GPU and saturates below
    `matmul_eff`: the roofline (Williams et al. 2009) adds the weight reads, a fixed cost
    per call, to FLOPs that grow with the tokens, i.e. eff = e_max * t / (t + t_ridge).
    Small calls sit far below (calibration README: the 125M model at 8x512 reaches
    ~89 TFLOP/s, the 1B at 32x512 ~385)."""
    compute, hbm = _device_forward(spec, tokens, 1, Strategy(tp=tp), gpu, params)
    return forward_flops(spec, tokens, 1) / tp / (gpu.peak_bf16_flops * (compute + hbm))


@dataclass(frozen=True)
class _Split:
    """How a batch is cut: sequences per dp replica and per micro-batch, layers per stage."""

    per_replica: int
    micro_batches: int
    per_micro: int
    layers: float


def _split(spec: ModelSpec, batch: int, strategy: Strategy) -> _Split:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    per_replica = math.ceil(batch / strategy.dp)
    m = min(strategy.micro_batches, per_replica)
    return _Split(per_replica, m, math.ceil(per_replica / m), spec.num_layers / strategy.pp)


def _bandwidths(strategy: Strategy, gpu: GPUType, gpus_per_node: int) -> tuple[float, float, float]:
    """(tp, pp, dp) group bandwidths with Megatron's rank order (tp fastest, then pp, then
    dp): a group stays on NVLink while it fits in a node."""
    def bw(span: int) -> float:
        return gpu.intra_node_bw if span <= gpus_per_node else gpu.inter_node_bw
    return (bw(strategy.tp), bw(strategy.tp * strategy.pp),
            bw(strategy.world))


def _device_forward(spec: ModelSpec, batch: int, seq: int, strategy: Strategy,
                    gpu: GPUType, params: CostParams) -> tuple[float, float]:
    """(compute, hbm) seconds of one stage's forward over `batch` x `seq` tokens.

    compute = FLOPs / tp*pp / (peak * matmul_eff) + a fixed amount of work per token per
    layer (`token_layer_flops`, in FLOP-equivalents of the GPU's peak). The calibration
    runs (hidden 768-2048) call for it: a least-squares fit of the six 16k-token forward
    runs alone gives FLOPs/(~510 TFLOP/s) + ~77 ns per token per layer within 7%, while
    a term proportional to the hidden size instead needs a matmul rate above the measured
    741 TFLOP/s ceiling (the full fit gives 485 TFLOP/s + 54 ns). It stands for the
    kernels whose cost does not grow with h^2 (norms, rotary, residual adds, softmax,
    tile waste of narrow GEMMs); every GPU of a TP group runs them over all the tokens.
    hbm = the stage's weights, read at least once per call (Williams et al. 2009)."""
    shards = strategy.tp * strategy.pp
    tokens = batch * seq
    compute = (forward_flops(spec, batch, seq) / shards
               / (gpu.peak_bf16_flops * params.matmul_eff)
               + params.token_layer_flops * tokens * spec.num_layers / strategy.pp
               / gpu.peak_bf16_flops)
    return compute, spec.weight_bytes / shards / (gpu.hbm_bandwidth * params.hbm_eff)


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


def _pipeline(per_micro_stage: float, strategy: Strategy, micro_batches: int) -> float:
    """GPipe / 1F1B schedule: (m + p - 1) stage slots, a bubble of (p - 1)/m of the ideal
    time (Huang et al. 2019; Narayanan et al. 2021 §2.2)."""
    return (micro_batches + strategy.pp - 1) * per_micro_stage


# ---------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------
def forward_breakdown(spec: ModelSpec, batch: int, seq: int, strategy: Strategy = Strategy(),
                      gpu: GPUType = H100_80G, *, params: CostParams = CALIBRATED,
                      gpus_per_node: int = 8) -> dict[str, float]:
    """Terms of a no-grad forward over `batch` sequences of `seq` tokens; "total" is the
    time."""
    sp = _split(spec, batch, strategy)
    tp_bw, pp_bw, dp_bw = _bandwidths(strategy, gpu, gpus_per_node)
    compute, hbm = _device_forward(spec, sp.per_micro, seq, strategy, gpu, params)
    tokens = sp.per_micro * seq
    comm = _tp_comm(spec, tokens, sp.layers, 2, strategy, tp_bw)
    p2p = _pp_p2p(spec, tokens, strategy, pp_bw)
    device = _pipeline(compute + hbm + comm + p2p, strategy, sp.micro_batches)
    host = sp.micro_batches * (params.host_call_s + params.host_layer_s * sp.layers)
    gather = 0.0
    if strategy.zero == 3:   # ZeRO-3 inference gathers the weights once per call
        gather = allgather_time(spec.weight_bytes / (strategy.tp * strategy.pp),
                                strategy.dp, dp_bw)
    total = smooth_max(host, device, params.overlap_exp) + gather
    return {"total": total, "host": host, "compute": compute * sp.micro_batches,
            "hbm": hbm * sp.micro_batches, "tp_comm": comm * sp.micro_batches,
            "pp_bubble": (strategy.pp - 1) * (compute + hbm + comm + p2p),
            "dp_comm": gather}


def forward_time(spec: ModelSpec, batch: int, seq: int, strategy: Strategy = Strategy(),
                 gpu: GPUType = H100_80G, *, params: CostParams = CALIBRATED,
                 gpus_per_node: int = 8) -> float:
    return forward_breakdown(spec, batch, seq, strategy, gpu, params=params,
                             gpus_per_node=gpus_per_node)["total"]


def _dp_grad_comm(spec: ModelSpec, strategy: Strategy, bw: float) -> float:
    """Gradient synchronisation per step. ZeRO-0/1: all-reduce of the bf16 grads; ZeRO-2:
    reduce-scatter of grads + all-gather of updated weights (same volume); ZeRO-3 adds a
    weight all-gather in forward and backward: 1.5x (Rajbhandari et al. 2020 §7)."""
    if strategy.dp == 1:
        return 0.0
    nbytes = GRAD_BYTES * spec.num_params / (strategy.tp * strategy.pp)
    base = allreduce_time(nbytes, strategy.dp, bw)
    return 1.5 * base if strategy.zero == 3 else base


def train_breakdown(spec: ModelSpec, batch: int, seq: int, strategy: Strategy = Strategy(),
                    gpu: GPUType = H100_80G, *, params: CostParams = CALIBRATED,
                    gpus_per_node: int = 8) -> dict[str, float]:
    """Terms of one optimizer step over `batch` sequences of `seq` tokens."""
    sp = _split(spec, batch, strategy)
    tp_bw, pp_bw, dp_bw = _bandwidths(strategy, gpu, gpus_per_node)
    compute, hbm = _device_forward(spec, sp.per_micro, seq, strategy, gpu, params)
    # backward: 2x the FLOPs; recomputation runs the forward once more
    compute *= 1.0 + strategy.recompute + 2.0 / max(params.bwd_eff_ratio, 1e-9)
    hbm *= 3.0 + strategy.recompute   # weights read in forward, data-grad, weight-grad
    tokens = sp.per_micro * seq
    comm = _tp_comm(spec, tokens, sp.layers, 4, strategy, tp_bw)
    p2p = 2 * _pp_p2p(spec, tokens, strategy, pp_bw)
    stage = compute + hbm + comm + p2p
    local_params = spec.num_params / (strategy.tp * strategy.pp)
    if strategy.zero >= 1:
        local_params /= strategy.dp
    optimizer = OPTIMIZER_TRAFFIC_BYTES_PER_PARAM * local_params / (
        gpu.hbm_bandwidth * params.hbm_eff)
    if strategy.offload:   # grads down, weights up over PCIe; Adam on the node's CPUs
        optimizer = (2 * GRAD_BYTES * local_params / gpu.host_bw
                     + local_params * gpus_per_node / CPU_ADAM_PARAMS_PER_S_PER_NODE)
    device = _pipeline(stage, strategy, sp.micro_batches) + optimizer
    host = sp.micro_batches * (params.host_call_s + params.train_host_layer_s * sp.layers)
    dp_comm = _dp_grad_comm(spec, strategy, dp_bw)
    total = smooth_max(host, device, params.overlap_exp) + dp_comm
    return {"total": total, "host": host, "compute": compute * sp.micro_batches,
            "hbm": hbm * sp.micro_batches, "tp_comm": comm * sp.micro_batches,
            "pp_bubble": (strategy.pp - 1) * stage, "optimizer": optimizer,
            "dp_comm": dp_comm}


def train_time(spec: ModelSpec, batch: int, seq: int, strategy: Strategy = Strategy(),
               gpu: GPUType = H100_80G, *, params: CostParams = CALIBRATED,
               gpus_per_node: int = 8) -> float:
    return train_breakdown(spec, batch, seq, strategy, gpu, params=params,
                           gpus_per_node=gpus_per_node)["total"]


def _decode_step_device(spec: ModelSpec, batch: int, context: float, strategy: Strategy,
                        gpu: GPUType, params: CostParams) -> tuple[float, float]:
    """(compute, bytes) of one decode step of one stage: every weight and the whole KV
    cache are read once per generated token (Pope et al. 2022, "Efficiently Scaling
    Transformer Inference", §2: decode is memory-bandwidth bound at small batch)."""
    shards = strategy.tp * strategy.pp
    flops = (2.0 * matmul_params(spec) * batch
             + attention_flops(spec, batch, 1, int(round(context)))) / shards
    # Skinny decode GEMMs are bound by reading the weights (the bytes term), not by a
    # low matmul efficiency: their FLOPs run at the saturated rate (roofline).
    compute = (flops / (gpu.peak_bf16_flops * params.matmul_eff)
               + params.token_layer_flops * batch * spec.num_layers / strategy.pp
               / gpu.peak_bf16_flops)
    nbytes = (spec.weight_bytes / shards
              + kv_cache_bytes(spec, batch, int(round(context)), strategy.tp, strategy.pp))
    return compute, nbytes


def generate_breakdown(spec: ModelSpec, batch: int, prompt_len: int, new_tokens: int,
                       strategy: Strategy = Strategy(), gpu: GPUType = H100_80G,
                       engine: str = "hf", *, params: CostParams = CALIBRATED,
                       gpus_per_node: int = 8) -> dict[str, float]:
    """Prefill of the prompts, then `new_tokens - 1` decode steps (the prefill yields the
    first token). `engine`: "hf" = Hugging Face eager `generate` (host-overhead bound,
    ~0.75 ms per layer per step on the calibration H100); "graph" = a CUDA-graph engine
    of the vLLM / SGLang class (near the HBM-bandwidth bound)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    if new_tokens < 0 or prompt_len < 1:
        raise ValueError("generate needs prompt_len >= 1 and new_tokens >= 0")
    sp = _split(spec, batch, strategy)
    b = sp.per_micro
    tp_bw, pp_bw, _ = _bandwidths(strategy, gpu, gpus_per_node)
    hbm_bw = gpu.hbm_bandwidth * params.hbm_eff
    # Prefill: a compute-bound forward over the prompts.
    pre_compute, pre_hbm = _device_forward(spec, b, prompt_len, strategy, gpu, params)
    pre_device = (pre_compute + pre_hbm
                  + _tp_comm(spec, b * prompt_len, sp.layers, 2, strategy, tp_bw)
                  + _pp_p2p(spec, b * prompt_len, strategy, pp_bw))
    # Decode: one step at the mean context length (the KV term is linear in it).
    context = prompt_len + new_tokens / 2.0
    compute, nbytes = _decode_step_device(spec, b, context, strategy, gpu, params)
    step_comm = (_tp_comm(spec, b, sp.layers, 2, strategy, tp_bw)
                 + _pp_p2p(spec, b, strategy, pp_bw))
    bound = nbytes / hbm_bw
    # The per-layer floor is device time (small kernels run back to back), in both engines.
    floor = params.graph_layer_s * sp.layers
    step_device = max(params.decode_bw_slowdown * bound, compute) + floor + step_comm
    if engine == "hf":
        # A decode step is one eager model call (sampling etc. fitted as negligible).
        host = params.host_call_s + params.host_layer_s * sp.layers
        step_stage = smooth_max(host, step_device, params.overlap_exp)
        prefill_stage = smooth_max(host, pre_device, params.overlap_exp)
    else:   # one graph replay a step: no host term beyond the device's own floor
        host = 0.0
        step_stage = step_device
        prefill_stage = pre_device
    # Pipeline stages process a token in turn; micro-batches fill them (at most pp busy).
    slots = max(sp.micro_batches, strategy.pp)
    prefill = _pipeline(prefill_stage, strategy, sp.micro_batches)
    step = slots * step_stage
    total = prefill + max(new_tokens - 1, 0) * step
    return {"total": total, "prefill": prefill, "decode_step": step, "host_step": host,
            "hbm_bound_step": bound, "compute_step": compute, "tp_comm_step": step_comm}


def generate_time(spec: ModelSpec, batch: int, prompt_len: int, new_tokens: int,
                  strategy: Strategy = Strategy(), gpu: GPUType = H100_80G,
                  engine: str = "hf", *, params: CostParams = CALIBRATED,
                  gpus_per_node: int = 8) -> float:
    return generate_breakdown(spec, batch, prompt_len, new_tokens, strategy, gpu, engine,
                              params=params, gpus_per_node=gpus_per_node)["total"]


# ---------------------------------------------------------------------------------------
# Memory (bytes per GPU)
# ---------------------------------------------------------------------------------------
def activation_bytes_per_layer(spec: ModelSpec, batch: int, seq: int, tp: int = 1,
                               params: CostParams = CALIBRATED,
                               flash_attention: bool = True) -> float:
    """s*b*h*(34 + 5*a*s/h) / tp (Korthikanti et al. 2022 eq. (1) and §4.2.2, tensor +
    sequence parallel). The 34 is fitted for HF bf16 autocast (`act_mem_bytes`); the
    score term is dropped with flash attention."""
    per_token = params.act_mem_bytes
    if not flash_attention:
        per_token += KORTHIKANTI_SCORE_BYTES * spec.num_heads * seq / spec.hidden_size
    return seq * batch * spec.hidden_size * per_token / tp


def model_state_bytes(spec: ModelSpec, strategy: Strategy) -> float:
    """Mixed-precision Adam states per GPU: 16 B/param over tp*pp, with the ZeRO stage's
    12/14/16 bytes sharded over dp (Rajbhandari et al. 2020). With `offload` the 12 B of
    fp32 states are in host memory (host_state_bytes) and the GPU keeps the bf16 weights
    and gradients, sharded as the stage says (ZeRO-Offload, Ren et al. 2021 §4.1)."""
    local = spec.num_params / (strategy.tp * strategy.pp)
    sharded = ZERO_SHARDED_BYTES[strategy.zero]
    if strategy.offload:
        on_gpu = ADAM_BYTES_PER_PARAM - OFFLOAD_HOST_BYTES_PER_PARAM
        sharded = max(0, sharded - OFFLOAD_HOST_BYTES_PER_PARAM)
        return local * (on_gpu - sharded + sharded / strategy.dp)
    return local * (ADAM_BYTES_PER_PARAM - sharded + sharded / strategy.dp)


def host_state_bytes(spec: ModelSpec, strategy: Strategy) -> float:
    """Host memory one GPU's rank holds for an optimizer-offloaded train: its share of
    the 12 B/param fp32 states (sharded over dp from ZeRO-1 on)."""
    if not strategy.offload:
        return 0.0
    local = spec.num_params / (strategy.tp * strategy.pp)
    return local * OFFLOAD_HOST_BYTES_PER_PARAM / (strategy.dp if strategy.zero >= 1 else 1)


def train_memory(spec: ModelSpec, batch: int, seq: int, strategy: Strategy = Strategy(), *,
                 params: CostParams = CALIBRATED, flash_attention: bool = True) -> int:
    """Peak bytes per GPU of a training step: model states + activations of the in-flight
    micro-batches (1F1B keeps up to p on the first stage, each of L/p layers: Narayanan et
    al. 2021 §2.2.1, Korthikanti et al. 2022 §4.2.3) + the logits and their loss/grad
    copies on the last stage."""
    sp = _split(spec, batch, strategy)
    states = model_state_bytes(spec, strategy)
    act = activation_bytes_per_layer(spec, sp.per_micro, seq, strategy.tp, params,
                                      flash_attention) * sp.layers
    if strategy.recompute:   # layer inputs kept, one layer's activations live at a time
        act = (RECOMPUTE_ACT_BYTES * sp.per_micro * seq * spec.hidden_size / strategy.tp
               * sp.layers + act / sp.layers)
    logits = sp.per_micro * seq * _head_width(spec) / strategy.tp * params.logit_train_bytes
    first = states + act * min(strategy.pp, sp.micro_batches)
    last = states + act + logits
    return int(max(first, last))


def _weights_per_gpu(spec: ModelSpec, strategy: Strategy) -> float:
    w = spec.weight_bytes / (strategy.tp * strategy.pp)
    return w / strategy.dp if strategy.zero == 3 else w


def forward_memory(spec: ModelSpec, batch: int, seq: int, strategy: Strategy = Strategy(), *,
                   params: CostParams = CALIBRATED, kv_cache: bool = False) -> int:
    """Weights (bf16) + the returned logits with the head's transient copies
    (`logit_fwd_bytes` per logit, fitted) + one layer's transient activations, + with
    `kv_cache` the KV cache of every token, which Hugging Face models build in a plain
    `model(ids)` call (use_cache defaults to True; the calibration protocol measured it,
    graphrl's engines pass use_cache=False)."""
    sp = _split(spec, batch, strategy)
    tokens = sp.per_micro * seq
    logits = tokens * _head_width(spec) / strategy.tp * params.logit_fwd_bytes
    transient = params.fwd_transient_bytes * tokens * spec.hidden_size / strategy.tp
    kv = kv_cache_bytes(spec, sp.per_micro, seq, strategy.tp, strategy.pp) if kv_cache else 0
    return int(_weights_per_gpu(spec, strategy) + logits + transient + kv)


def generate_memory(spec: ModelSpec, batch: int, prompt_len: int, new_tokens: int,
                    strategy: Strategy = Strategy(), *, params: CostParams = CALIBRATED) -> int:
    """Weights / (tp*pp) + the KV cache of prompt + new tokens (2*L*n_kv*d_head*bytes per
    token, vLLM paper §2.2, Kwon et al. 2023) + the prefill's transient activations and
    the last position's logits (HF generate computes no others)."""
    sp = _split(spec, batch, strategy)
    b = sp.per_replica   # every sequence of the replica holds its cache until it ends
    kv = kv_cache_bytes(spec, b, prompt_len + new_tokens, strategy.tp, strategy.pp)
    transient = (params.fwd_transient_bytes * sp.per_micro * prompt_len * spec.hidden_size
                 + params.logit_fwd_bytes * sp.per_micro * _head_width(spec)) / strategy.tp
    return int(_weights_per_gpu(spec, strategy) + kv + transient)


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------
def estimate(spec: ModelSpec, phase: str, batch: int, seq: int,
             strategy: Strategy = Strategy(), gpu: GPUType = H100_80G, new_tokens: int = 0,
             engine: str = "hf", *, params: CostParams = CALIBRATED,
             gpus_per_node: int = 8, forward_kv_cache: bool = False) -> CallCost:
    """Seconds and peak bytes per GPU of one call. For "generate", `seq` is the prompt
    length and `new_tokens` the tokens generated per sequence. `forward_kv_cache`: the
    forward builds a KV cache (a plain HF `model(ids)` call; see forward_memory)."""
    if phase == "forward":
        terms = forward_breakdown(spec, batch, seq, strategy, gpu, params=params,
                                  gpus_per_node=gpus_per_node)
        mem = forward_memory(spec, batch, seq, strategy, params=params,
                             kv_cache=forward_kv_cache)
    elif phase == "train":
        terms = train_breakdown(spec, batch, seq, strategy, gpu, params=params,
                                gpus_per_node=gpus_per_node)
        mem = train_memory(spec, batch, seq, strategy, params=params)
    elif phase == "generate":
        terms = generate_breakdown(spec, batch, seq, new_tokens, strategy, gpu, engine,
                                   params=params, gpus_per_node=gpus_per_node)
        mem = generate_memory(spec, batch, seq, new_tokens, strategy, params=params)
    else:
        raise ValueError(f"unknown phase {phase!r} (known: {', '.join(PHASES)})")
    seconds = terms.pop("total")
    return CallCost(seconds, mem, tuple(sorted(terms.items())))


__all__ = ["PHASES", "ENGINES", "CostParams", "CALIBRATED", "CallCost", "estimate",
           "forward_time", "train_time", "generate_time", "forward_breakdown",
           "train_breakdown", "generate_breakdown", "train_memory", "forward_memory",
           "generate_memory", "model_state_bytes", "host_state_bytes", "activation_bytes_per_layer",
           "allreduce_time", "allgather_time", "reduce_scatter_time", "reshard_time",
           "forward_flops", "train_flops", "attention_flops", "matmul_params",
           "kv_cache_bytes", "matmul_efficiency", "smooth_max"]
