"""Compute terms of the cost model: FLOPs of a model's calls, the device time of one
pipeline stage's forward, matmul efficiency, how a batch is cut over dp replicas and
micro-batches, and the pipeline schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .cluster import GPUType, H100_80G
from .cost_params import CALIBRATED, CostParams
from .parallel import Strategy
from .types import DTYPE_BYTES, ModelSpec


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
    return forward_flops(spec, tokens, 1) / tp / (gpu.peak_flops(spec.dtype) * (compute + hbm))


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
               / (gpu.peak_flops(spec.dtype) * params.matmul_eff)
               + params.token_layer_flops * tokens * spec.num_layers / strategy.pp
               / gpu.peak_flops(spec.dtype))
    return compute, spec.weight_bytes / shards / (gpu.hbm_bandwidth * params.hbm_eff)


def _pipeline(per_micro_stage: float, strategy: Strategy, micro_batches: int) -> float:
    """GPipe / 1F1B schedule: (m + p - 1) stage slots, a bubble of (p - 1)/m of the ideal
    time (Huang et al. 2019; Narayanan et al. 2021 §2.2)."""
    return (micro_batches + strategy.pp - 1) * per_micro_stage


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
    compute = (flops / (gpu.peak_flops(spec.dtype) * params.matmul_eff)
               + params.token_layer_flops * batch * spec.num_layers / strategy.pp
               / gpu.peak_flops(spec.dtype))
    nbytes = (spec.weight_bytes / shards
              + kv_cache_bytes(spec, batch, int(round(context)), strategy.tp, strategy.pp))
    return compute, nbytes

