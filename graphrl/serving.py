"""Generation priced as a serving engine runs it: a KV budget, continuous refill, a tail.

`cost.generate_breakdown` prices a batch whose every sequence is `new_tokens` long and
whose whole KV cache is resident at once. Engines of the vLLM / SGLang class instead
(Kwon et al. 2023, "Efficient Memory Management for LLM Serving with PagedAttention",
§4; Yu et al. 2022, "Orca", §4.2 iteration-level scheduling):

- reserve `gpu_memory_utilization` of the GPU (vLLM's default 0.9), and after the weights
  and the prefill's working memory fill the rest with KV blocks: the KV budget;
- admit sequences while their KV fits the budget and refill a finished sequence's slot
  at once (continuous batching), so a batch whose KV exceeds the budget runs in waves
  instead of not fitting;
- pay per decode step for the sequences running in it: the batch shrinks as short
  responses end, and the longest responses set the tail (Fu et al. 2025, "AReaL", §2;
  verl / DAPO report the same long-tail effect);
- (the eager "hf" engine instead batches statically: the batch decodes until its longest
  response ends, all of its KV resident at once);
- prefill newly admitted sequences between decode steps (vLLM's default scheduling
  stalls the running decodes while it prefills; Agrawal et al. 2024 "Sarathi-Serve" §3).

Every per-step term is `cost`'s own (weights + KV read per step, the per-layer floor,
TP collectives, host overhead for the eager engine), so with fixed lengths and a KV
cache that fits this equals `cost.generate_breakdown` exactly (tests/test_serving.py).

Admission reserves each sequence's final KV length (the engine does not know it; vLLM
allocates blocks as tokens come and preempts when it runs out, which packs about as
tightly at the cost of some recomputation we do not charge). Each of the `dp` engine
replicas gets an equal share of the batch; the plan waits for the slowest, which holds
the longest responses (`lengths_of_slowest_replica`).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from . import cost as C
from .cluster import GPUType
from .lengths import LengthDist, fixed
from .parallel import Strategy
from .types import ModelSpec

GPU_MEMORY_UTILIZATION = 0.9     # vLLM's default share of the GPU the engine may take
PREFILL_CHUNK_TOKENS = 16384     # prompt tokens prefilled together once the batch runs in
                                 # waves (vLLM/SGLang max_num_batched_tokens class)
SPREAD_DRAWS = 16                # length draws behind a plan's p50 / p90 generation time


@dataclass(frozen=True)
class ServingResult:
    seconds: float
    peak_bytes: int
    breakdown: tuple[tuple[str, float], ...]


def lengths_of_slowest_replica(lengths: np.ndarray, dp: int) -> np.ndarray:
    """Deal the batch's lengths (longest first) to dp replicas in turn: replica 0 gets the
    longest of every dp, i.e. the slowest replica; its lengths in a fixed shuffled arrival
    order (seeded, so that the price is deterministic)."""
    mine = np.sort(lengths)[::-1][::dp]
    return np.random.default_rng(0).permutation(mine)


def _step_fn(spec: ModelSpec, prompt_len: int, strategy: Strategy, gpu: GPUType,
             engine: str, params: C.CostParams, gpus_per_node: int):
    """(prefill(g), decode_step(b, mean_context)) of one replica, cost.py's formulas."""
    tp_bw, pp_bw, _ = C._bandwidths(strategy, gpu, gpus_per_node)
    tp_nodes = C.group_nodes(strategy, gpus_per_node)[0]
    layers = spec.num_layers / strategy.pp
    hbm_bw = gpu.hbm_bandwidth * params.hbm_eff
    host = params.host_call_s + params.host_layer_s * layers if engine == "hf" else 0.0
    floor = params.graph_layer_s * layers

    def prefill(g: int) -> float:
        pc, ph = C._device_forward(spec, g, prompt_len, strategy, gpu, params)
        dev = (pc + ph + C._tp_comm(spec, g * prompt_len, layers, 2, strategy, tp_bw, tp_nodes)
               + C._pp_p2p(spec, g * prompt_len, strategy, pp_bw))
        return C.smooth_max(host, dev, params.overlap_exp) if engine == "hf" else dev

    def step(b: int, context: float) -> float:
        compute, nbytes = C._decode_step_device(spec, b, context, strategy, gpu, params)
        comm = (C._tp_comm(spec, b, layers, 2, strategy, tp_bw, tp_nodes)
                + C._pp_p2p(spec, b, strategy, pp_bw))
        dev = max(params.decode_bw_slowdown * nbytes / hbm_bw, compute) + floor + comm
        return C.smooth_max(host, dev, params.overlap_exp) if engine == "hf" else dev

    return prefill, step


def simulate_replica(lengths: np.ndarray, prompt_len: int, kv_tokens: float, prefill, step,
                     chunk: int) -> tuple[float, float, int]:
    """Continuous batching of one replica's sequences (arrival order = array order) with
    at most `kv_tokens` tokens of KV reserved at once. Returns (prefill seconds, decode
    seconds, most sequences running together). A sequence admitted after decode step s0
    gets its first token from the prefill and ends after L - 1 decode steps; at step s
    it holds prompt + 1 + (s - s0) tokens."""
    n = len(lengths)
    pre_s = dec_s = 0.0
    s = 0                                   # decode steps done
    ends: list[tuple[int, int]] = []        # (end step, index)
    reserved = 0.0
    base = 0.0                              # sum over running of prompt + 1 - s0
    running = most = 0
    i = 0
    while i < n or running:
        # admit while the next sequence's final KV fits (at least one when none runs)
        # (prefilled in groups of at most `chunk` sequences)
        group = 0
        while i < n and (reserved + prompt_len + lengths[i] <= kv_tokens or running == 0):
            L = int(lengths[i])
            reserved += prompt_len + L
            base += prompt_len + 1 - s
            heapq.heappush(ends, (s + L - 1, i))
            running += 1
            group += 1
            i += 1
            if group == chunk:
                pre_s += prefill(group)
                group = 0
        if group:
            pre_s += prefill(group)
        most = max(most, running)
        # sequences whose last token came from the prefill (L = 1) end now
        nxt = ends[0][0]
        k = nxt - s
        if k > 0:
            mid = s + (k - 1) / 2.0
            dec_s += k * step(running, (base + running * mid) / running)
            s = nxt
        while ends and ends[0][0] == s:
            _, j = heapq.heappop(ends)
            L = int(lengths[j])
            reserved -= prompt_len + L
            base -= prompt_len + 1 - (s - L + 1)
            running -= 1
    return pre_s, dec_s, most


def serve_generate(spec: ModelSpec, batch: int, prompt_len: int, new_tokens: int,
                   strategy: Strategy, gpu: GPUType, engine: str = "graph", *,
                   lengths: LengthDist | None = None,
                   utilization: float = GPU_MEMORY_UTILIZATION,
                   params: C.CostParams = C.CALIBRATED, gpus_per_node: int = 8,
                   draw: np.ndarray | None = None) -> ServingResult:
    """Seconds and peak bytes per GPU of one generate call served by an engine with a
    `utilization` share of the GPU, responses drawn from `lengths` (capped at
    `new_tokens`; None = all `new_tokens` long). `draw`: the batch's lengths to use
    instead of the distribution's stratified quantiles (for the spread)."""
    if strategy.pp > 1 or new_tokens < 1:
        cc = C.estimate(spec, "generate", batch, prompt_len, strategy, gpu, new_tokens,
                        engine, params=params, gpus_per_node=gpus_per_node)
        return ServingResult(cc.seconds, cc.peak_memory_bytes, cc.breakdown)
    dist = (lengths or fixed(new_tokens)).capped(new_tokens)
    mine = lengths_of_slowest_replica(dist.quantiles(batch) if draw is None else draw,
                                      strategy.dp)
    if engine == "hf":
        # Eager Hugging Face `generate` batches statically: every row stays in the batch
        # (and its KV cache) until the longest one stops, and nothing is refilled.
        cc = C.estimate(spec, "generate", batch, prompt_len, strategy, gpu, int(mine.max()),
                        engine, params=params, gpus_per_node=gpus_per_node)
        return ServingResult(cc.seconds, cc.peak_memory_bytes, cc.breakdown)
    n = len(mine)
    weights = C._weights_per_gpu(spec, strategy)
    kv_token = C.kv_cache_bytes(spec, 1, 1, strategy.tp, strategy.pp)
    limit = utilization * gpu.memory_bytes

    def transient(g: int) -> float:   # the prefill's working set, as cost.generate_memory
        return (params.fwd_transient_bytes * g * prompt_len * spec.hidden_size
                + params.logit_fwd_bytes * g * C._head_width(spec)) / strategy.tp

    kv_all = kv_token * float(np.sum(prompt_len + mine))
    if weights + transient(n) + kv_all <= limit:   # one wave: everything resident
        chunk, peak = n, weights + transient(n) + kv_all
        kv_tokens = math.inf
    else:   # waves: chunked prefill, the rest of the engine's share is KV blocks
        chunk = max(1, min(n, PREFILL_CHUNK_TOKENS // prompt_len))
        longest = kv_token * (prompt_len + int(mine.max()))
        peak = max(limit, weights + transient(chunk) + longest)
        kv_tokens = max(0.0, peak - weights - transient(chunk)) / kv_token * (1 + 1e-12)
    prefill, step = _step_fn(spec, prompt_len, strategy, gpu, engine, params, gpus_per_node)
    pre_s, dec_s, most = simulate_replica(mine, prompt_len, kv_tokens, prefill, step, chunk)
    breakdown = {"prefill": pre_s, "decode": dec_s, "max_running": float(most),
                 "waves": n / max(most, 1), "kv_budget_tokens": kv_tokens,
                 "mean_len": float(np.mean(mine)), "max_len": float(mine.max())}
    return ServingResult(pre_s + dec_s, int(peak), tuple(sorted(breakdown.items())))


def generation_spread(spec: ModelSpec, batch: int, prompt_len: int, new_tokens: int,
                      strategy: Strategy, gpu: GPUType, engine: str = "graph", *,
                      lengths: LengthDist | None = None,
                      utilization: float = GPU_MEMORY_UTILIZATION,
                      params: C.CostParams = C.CALIBRATED, gpus_per_node: int = 8,
                      draws: int = SPREAD_DRAWS) -> tuple[float, float]:
    """(p50, p90) seconds of the call over `draws` iid length draws of the whole batch
    (seeds 0..draws-1), each priced at its slowest replica."""
    dist = (lengths or fixed(new_tokens)).capped(max(new_tokens, 1))
    times = [serve_generate(spec, batch, prompt_len, new_tokens, strategy, gpu, engine,
                            lengths=dist, utilization=utilization, params=params,
                            gpus_per_node=gpus_per_node,
                            draw=dist.draw(batch, seed)).seconds for seed in range(draws)]
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


__all__ = ["GPU_MEMORY_UTILIZATION", "ServingResult", "serve_generate", "generation_spread",
           "simulate_replica", "lengths_of_slowest_replica"]
