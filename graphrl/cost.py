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

from dataclasses import dataclass

from .cluster import GiB, GPUType, H100_80G
# The model is split by what it prices; this module keeps the per-call time breakdowns and
# the entry point, and re-exports the rest so `graphrl.cost` stays the one place to import.
from .comm_cost import (_bandwidths, _dp_grad_comm, _pp_p2p, _tp_comm, allgather_time,
                        allreduce_time, group_nodes, nccl_allgather_time, nccl_allreduce_time,
                        reduce_scatter_time, reshard_received_bytes, reshard_time,
                        zero3_gather_time)
from .compute_cost import (_decode_step_device, _device_forward, _head_width, _pipeline,
                           _split, _Split, attention_flops, forward_flops, kv_cache_bytes,
                           matmul_efficiency, matmul_params, smooth_max, train_flops)
# Re-exported: graphrl.calibrate and callers read the constants from graphrl.cost.
from .cost_params import (ADAM_BYTES_PER_PARAM, CALIBRATED,
                          COLLECTIVE_STEP_LATENCY_S,
                          CPU_ADAM_PARAMS_PER_S_PER_NODE, FITTED_ACT_MEM_BYTES,
                          FITTED_BWD_EFF_RATIO, FITTED_DECODE_BW_SLOWDOWN,
                          FITTED_FWD_TRANSIENT_BYTES, FITTED_GRAPH_LAYER_S,
                          FITTED_HBM_EFF, FITTED_HOST_CALL_S,
                          FITTED_HOST_LAYER_S, FITTED_LOGIT_FWD_BYTES,
                          FITTED_LOGIT_TRAIN_BYTES, FITTED_MATMUL_EFF,
                          FITTED_OVERLAP_EXP, FITTED_TOKEN_LAYER_FLOPS,
                          FITTED_TRAIN_HOST_LAYER_S, GRAD_BYTES,
                          KORTHIKANTI_ACT_BYTES, KORTHIKANTI_SCORE_BYTES,
                          OFFLOAD_HOST_BYTES_PER_PARAM,
                          OPTIMIZER_TRAFFIC_BYTES_PER_PARAM,
                          RECOMPUTE_ACT_BYTES, CostParams)
from .memory_cost import (_weights_per_gpu, activation_bytes_per_layer, forward_memory,
                          generate_memory, host_state_bytes, model_state_bytes, train_memory)
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

    def fits(self, gpu: GPUType, headroom: float = 0.0) -> bool:
        """Whether the peak fits in the GPU's memory less a `headroom` share of it."""
        return self.peak_memory_bytes <= gpu.memory_bytes * (1.0 - headroom)

    def as_dict(self) -> dict[str, object]:
        return {"seconds": self.seconds, "peak_memory_bytes": self.peak_memory_bytes,
                "peak_memory_gib": self.peak_memory_gib, "breakdown": dict(self.breakdown)}


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
    tp_nodes, dp_nodes = group_nodes(strategy, gpus_per_node)
    compute, hbm = _device_forward(spec, sp.per_micro, seq, strategy, gpu, params)
    tokens = sp.per_micro * seq
    comm = _tp_comm(spec, tokens, sp.layers, 2, strategy, tp_bw, tp_nodes)
    p2p = _pp_p2p(spec, tokens, strategy, pp_bw)
    device = _pipeline(compute + hbm + comm + p2p, strategy, sp.micro_batches)
    host = sp.micro_batches * (params.host_call_s + params.host_layer_s * sp.layers)
    gather = 0.0
    if strategy.zero == 3:   # ZeRO-3 inference gathers the weights once per call
        gather = zero3_gather_time(spec, strategy, dp_bw, dp_nodes)
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



def train_breakdown(spec: ModelSpec, batch: int, seq: int, strategy: Strategy = Strategy(),
                    gpu: GPUType = H100_80G, *, params: CostParams = CALIBRATED,
                    gpus_per_node: int = 8) -> dict[str, float]:
    """Terms of one optimizer step over `batch` sequences of `seq` tokens."""
    sp = _split(spec, batch, strategy)
    tp_bw, pp_bw, dp_bw = _bandwidths(strategy, gpu, gpus_per_node)
    tp_nodes, dp_nodes = group_nodes(strategy, gpus_per_node)
    compute, hbm = _device_forward(spec, sp.per_micro, seq, strategy, gpu, params)
    # backward: 2x the FLOPs; recomputation runs the forward once more. LoRA (graphrl.lora)
    # computes no weight gradients for the frozen base: its backward is the data-gradient
    # half (activation gradients still flow through every layer), the adapters' own
    # FLOPs (r << hidden) neglected
    lora = spec.lora is not None
    compute *= 1.0 + strategy.recompute + (1.0 if lora else 2.0) / max(params.bwd_eff_ratio,
                                                                       1e-9)
    hbm *= 3.0 - lora + strategy.recompute   # weights read in forward, data-grad, weight-grad
    tokens = sp.per_micro * seq
    comm = _tp_comm(spec, tokens, sp.layers, 4, strategy, tp_bw, tp_nodes)
    p2p = 2 * _pp_p2p(spec, tokens, strategy, pp_bw)
    stage = compute + hbm + comm + p2p
    local_params = spec.trained_params / (strategy.tp * strategy.pp)   # Adam's
    if strategy.zero >= 1:
        local_params /= strategy.dp
    optimizer = OPTIMIZER_TRAFFIC_BYTES_PER_PARAM * local_params / (
        gpu.hbm_bandwidth * params.hbm_eff)
    if strategy.offload:   # grads down, weights up over PCIe; Adam on the node's CPUs
        optimizer = (2 * DTYPE_BYTES[spec.dtype] * local_params / gpu.host_bw
                     + local_params * gpus_per_node / CPU_ADAM_PARAMS_PER_S_PER_NODE)
    device = _pipeline(stage, strategy, sp.micro_batches) + optimizer
    host = sp.micro_batches * (params.host_call_s + params.train_host_layer_s * sp.layers)
    dp_comm = _dp_grad_comm(spec, strategy, dp_bw, sp.micro_batches, dp_nodes)
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
    tp_nodes = group_nodes(strategy, gpus_per_node)[0]
    hbm_bw = gpu.hbm_bandwidth * params.hbm_eff
    # Prefill: a compute-bound forward over the prompts.
    pre_compute, pre_hbm = _device_forward(spec, b, prompt_len, strategy, gpu, params)
    pre_device = (pre_compute + pre_hbm
                  + _tp_comm(spec, b * prompt_len, sp.layers, 2, strategy, tp_bw, tp_nodes)
                  + _pp_p2p(spec, b * prompt_len, strategy, pp_bw))
    # Decode: one step at the mean context length (the KV term is linear in it).
    context = prompt_len + new_tokens / 2.0
    compute, nbytes = _decode_step_device(spec, b, context, strategy, gpu, params)
    step_comm = (_tp_comm(spec, b, sp.layers, 2, strategy, tp_bw, tp_nodes)
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
           "nccl_allreduce_time", "nccl_allgather_time", "group_nodes", "zero3_gather_time",
           "reshard_received_bytes",
           "forward_flops", "train_flops", "attention_flops", "matmul_params",
           "kv_cache_bytes", "matmul_efficiency", "smooth_max"]

