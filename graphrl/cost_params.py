"""The cost model's constants: values from the literature and the fitted ones
(`CostParams`), kept apart so that the compute, memory and communication formulas
(graphrl/compute_cost.py, memory_cost.py, comm_cost.py) and graphrl/calibrate.py share them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Mapping

# ---------------------------------------------------------------------------------------
# Constants taken from the literature (not fitted)
# ---------------------------------------------------------------------------------------
# Mixed-precision Adam: 2 (fp16/bf16 weights) + 2 (grads) + 12 (fp32 master, momentum,
# variance) bytes per parameter; ZeRO stage 1/2/3 shards 12/14/16 of them over dp
# (Rajbhandari et al. 2020, "ZeRO", §3.1 and §5).
ADAM_BYTES_PER_PARAM = 16
ZERO_SHARDED_BYTES: Mapping[int, int] = MappingProxyType({0: 0, 1: 12, 2: 14, 3: 16})
# The same per precision (types.PRECISIONS): (weights, gradients, optimizer states) bytes
# per parameter of a trainable model. bf16 mixed precision keeps 2 + 2 + 12 as above; fp32
# keeps 4 (the weights are their own master copy) + 4 + 8 (Adam momentum and variance), so
# ZeRO 1/2/3 shard 8/12/16 of its 16 (the same paper's stage definitions: optimizer
# states; + gradients; + parameters). A frozen model keeps its weights only (2 or 4).
TRAIN_STATE_BYTES: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {"bf16": (2, 2, 12), "fp32": (4, 4, 8)})
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
# NCCL's own cost model of a collective (NVIDIA NCCL, src/graph/tuning.cc,
# ncclTopoTuneModel; NCCL 2.1x tables, microseconds): time = a base latency per call + a
# latency per ring/tree hop (NVLink hops cheaper than network hops) + bytes / bandwidth,
# for each algorithm (ring, tree) and protocol; NCCL runs the fastest. We keep two
# protocols: LL (low latency, 8-byte flag-carrying stores: a fifth of the ring bandwidth)
# and Simple (full bandwidth, higher per-hop latency). (base, NVLink hop, network hop):
NCCL_LATENCY_S = {
    ("ring", "LL"): (6.6e-6, 0.6e-6, 2.7e-6),
    ("ring", "Simple"): (8.4e-6, 3.4e-6, 14.0e-6),
    ("tree", "LL"): (6.8e-6, 0.6e-6, 5.0e-6),
    ("tree", "Simple"): (0.0, 4.0e-6, 14.0e-6),
}
# Bandwidth factor of each (algorithm, protocol) over the link's: LL moves 8-byte words
# carrying 4 bytes of data plus a flag and is further limited (NCCL: ring LL busBw / 5);
# a tree all-reduce moves 2 M per GPU (NCCL: algorithm bandwidth = bus bandwidth / 2), a
# ring 2 (n - 1) / n M.
NCCL_BW_FACTOR = {"LL": 1.0 / 5.0, "Simple": 1.0}
# Data-parallel gradients are all-reduced in buckets (one NCCL call each) overlapping the
# backward pass: Megatron-core's DistributedDataParallel uses buckets of
# max(40M, 1M x dp) parameters (megatron/core/distributed, `bucket_size` default).
DP_BUCKET_PARAMS = 40_000_000
DP_BUCKET_PARAMS_PER_RANK = 1_000_000

# ---------------------------------------------------------------------------------------
# Fitted constants. Obtained by `graphrl.calibrate.fit`: least squares over
# log(predicted / measured) (plus a small L4 term for the worst points) on every `run`
# record of benchmarks/data/calibration/h100_hf_llama.jsonl (one H100 80GB, HF transformers
# eager, SDPA), by a coordinate search from `calibrate.FIT_START`; the time constants on the run
# times, then the memory constants on the peak memory of the train / generate / forward
# runs; matmul_eff is capped by the measured matmul ceiling (741 TFLOP/s), hbm_eff is the
# measured copy bandwidth. Refit (prints these lines and a predicted-vs-measured table,
# then the held-out points of benchmarks/h100_check.py: 1B-7B, 4k tokens, never fitted):
#     python -m graphrl.calibrate benchmarks/data/calibration/h100_hf_llama.jsonl \
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


__all__ = ["ADAM_BYTES_PER_PARAM", "TRAIN_STATE_BYTES", "OPTIMIZER_TRAFFIC_BYTES_PER_PARAM", "GRAD_BYTES",
           "KORTHIKANTI_ACT_BYTES", "KORTHIKANTI_SCORE_BYTES",
           "OFFLOAD_HOST_BYTES_PER_PARAM", "CPU_ADAM_PARAMS_PER_S_PER_NODE",
           "RECOMPUTE_ACT_BYTES", "COLLECTIVE_STEP_LATENCY_S", "NCCL_LATENCY_S",
           "NCCL_BW_FACTOR", "DP_BUCKET_PARAMS", "DP_BUCKET_PARAMS_PER_RANK", "FITTED_MATMUL_EFF",
           "FITTED_HBM_EFF", "FITTED_TOKEN_LAYER_FLOPS", "FITTED_HOST_CALL_S",
           "FITTED_HOST_LAYER_S", "FITTED_OVERLAP_EXP", "FITTED_TRAIN_HOST_LAYER_S",
           "FITTED_BWD_EFF_RATIO", "FITTED_ACT_MEM_BYTES", "FITTED_LOGIT_TRAIN_BYTES",
           "FITTED_LOGIT_FWD_BYTES", "FITTED_FWD_TRANSIENT_BYTES",
           "FITTED_DECODE_BW_SLOWDOWN", "FITTED_GRAPH_LAYER_S", "CALIBRATED",
           "CostParams"]
