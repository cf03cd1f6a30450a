"""Memory terms of the cost model: peak bytes per GPU of training, forward and
generate calls, model states under ZeRO / offload, and activations.
"""
from __future__ import annotations

from .compute_cost import _head_width, _split, kv_cache_bytes
from .cost_params import (ADAM_BYTES_PER_PARAM, CALIBRATED, KORTHIKANTI_SCORE_BYTES,
                          OFFLOAD_HOST_BYTES_PER_PARAM, RECOMPUTE_ACT_BYTES,
                          ZERO_SHARDED_BYTES, CostParams)
from .parallel import Strategy
from .types import ModelSpec


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

