"""Memory terms of the cost model: peak bytes per GPU of training, forward and
generate calls, model states under ZeRO / offload, and activations.
"""
from __future__ import annotations

from .compute_cost import _head_width, _split, kv_cache_bytes
from .cost_params import (CALIBRATED, KORTHIKANTI_SCORE_BYTES, RECOMPUTE_ACT_BYTES,
                          TRAIN_STATE_BYTES, CostParams)
from .parallel import Strategy
from .types import DTYPE_BYTES, ModelSpec


def precision_scale(spec: ModelSpec) -> float:
    """Bytes of an activation element of this model over bf16's 2 (1 for bf16, 2 for
    fp32): the fitted per-element byte counts were measured under bf16 autocast."""
    return DTYPE_BYTES[spec.dtype] / 2


def zero_sharded_bytes(spec: ModelSpec, zero: int) -> int:
    """Bytes per parameter ZeRO stage `zero` shards over dp (Rajbhandari et al. 2020 §5:
    stage 1 the optimizer states, 2 + the gradients, 3 + the weights): 12/14/16 of bf16
    mixed precision's 16, 8/12/16 of fp32's 16 (cost_params.TRAIN_STATE_BYTES)."""
    weights, grads, optim = TRAIN_STATE_BYTES[spec.dtype]
    return (0, optim, optim + grads, optim + grads + weights)[zero]


def activation_bytes_per_layer(spec: ModelSpec, batch: int, seq: int, tp: int = 1,
                               params: CostParams = CALIBRATED,
                               flash_attention: bool = True) -> float:
    """s*b*h*(34 + 5*a*s/h) / tp (Korthikanti et al. 2022 eq. (1) and §4.2.2, tensor +
    sequence parallel). The 34 is fitted for HF bf16 autocast (`act_mem_bytes`); the
    score term is dropped with flash attention."""
    per_token = params.act_mem_bytes
    if not flash_attention:
        per_token += KORTHIKANTI_SCORE_BYTES * spec.num_heads * seq / spec.hidden_size
    return seq * batch * spec.hidden_size * per_token * precision_scale(spec) / tp


def model_state_bytes(spec: ModelSpec, strategy: Strategy) -> float:
    """Adam states per GPU of a trainable model: 16 B/param over tp*pp (bf16 mixed
    precision 2 + 2 + 12, fp32 4 + 4 + 8: cost_params.TRAIN_STATE_BYTES), with the ZeRO
    stage's share (zero_sharded_bytes) sharded over dp (Rajbhandari et al. 2020). With
    `offload` the optimizer states (12 or 8 B) are in host memory (host_state_bytes) and
    the GPU keeps the weights and gradients, sharded as the stage says (ZeRO-Offload, Ren
    et al. 2021 §4.1). LoRA (graphrl.lora): the frozen base holds its weights only (2 or
    4 B/param, sharded over dp under ZeRO-3), the adapters the states above."""
    if spec.lora is not None:
        return _weights_per_gpu(spec, strategy) + _state_bytes(spec.trained_params, spec,
                                                               strategy)
    return _state_bytes(spec.num_params, spec, strategy)


def _state_bytes(num_params: int, spec: ModelSpec, strategy: Strategy) -> float:
    local = num_params / (strategy.tp * strategy.pp)
    total = sum(TRAIN_STATE_BYTES[spec.dtype])
    sharded = zero_sharded_bytes(spec, strategy.zero)
    if strategy.offload:
        host = TRAIN_STATE_BYTES[spec.dtype][2]
        sharded = max(0, sharded - host)
        return local * (total - host - sharded + sharded / strategy.dp)
    return local * (total - sharded + sharded / strategy.dp)


def host_state_bytes(spec: ModelSpec, strategy: Strategy) -> float:
    """Host memory one GPU's rank holds for an optimizer-offloaded train: its share of
    the fp32 optimizer states, 12 B/param in bf16 mixed precision, 8 in fp32 (sharded
    over dp from ZeRO-1 on)."""
    if not strategy.offload:
        return 0.0
    local = spec.trained_params / (strategy.tp * strategy.pp)
    return (local * TRAIN_STATE_BYTES[spec.dtype][2]
            / (strategy.dp if strategy.zero >= 1 else 1))


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
        act = (RECOMPUTE_ACT_BYTES * precision_scale(spec) * sp.per_micro * seq
               * spec.hidden_size / strategy.tp * sp.layers + act / sp.layers)
    # the fitted bytes per logit hold bf16 logits and fp32 loss copies: fp32 doubles the
    # former (the 2 bf16 bytes become 4)
    logit_bytes = params.logit_train_bytes + 2 * (precision_scale(spec) - 1)
    logits = sp.per_micro * seq * _head_width(spec) / strategy.tp * logit_bytes
    first = states + act * min(strategy.pp, sp.micro_batches)
    last = states + act + logits
    return int(max(first, last))


def _weights_per_gpu(spec: ModelSpec, strategy: Strategy) -> float:
    w = spec.weight_bytes / (strategy.tp * strategy.pp)
    return w / strategy.dp if strategy.zero == 3 else w


def forward_memory(spec: ModelSpec, batch: int, seq: int, strategy: Strategy = Strategy(), *,
                   params: CostParams = CALIBRATED, kv_cache: bool = False) -> int:
    """Weights (2 or 4 B/param: a frozen model holds only them) + the returned logits
    with the head's transient copies (`logit_fwd_bytes` per logit, fitted in bf16; x2 in
    fp32) + one layer's transient activations (likewise), + with
    `kv_cache` the KV cache of every token, which Hugging Face models build in a plain
    `model(ids)` call (use_cache defaults to True; the calibration protocol measured it,
    graphrl's engines pass use_cache=False)."""
    sp = _split(spec, batch, strategy)
    tokens = sp.per_micro * seq
    scale = precision_scale(spec)
    logits = tokens * _head_width(spec) / strategy.tp * params.logit_fwd_bytes * scale
    transient = params.fwd_transient_bytes * scale * tokens * spec.hidden_size / strategy.tp
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
                 + params.logit_fwd_bytes * sp.per_micro * _head_width(spec)
                 ) * precision_scale(spec) / strategy.tp
    return int(_weights_per_gpu(spec, strategy) + kv + transient)

