"""What of a Hugging Face architecture the megatron engine (megatron.py) builds beyond
megatron-core's GPTModel defaults, and the check that refuses the rest.

- `read_architecture`: graphrl.architecture of the HF module's own config (a checkpoint's,
  not one rebuilt from ModelSpec), refused by name where megatron lacks a feature.
- `rope_inv_freq`: Llama-3.x rotary scaling with the checkpoint's own parameters.
- `BiasedRow` / `BiasedColumn`: linears with a bias where megatron-core's config cannot
  say so (Llama attention_bias: o but not the MLP; mlp_bias: the MLP but not o).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphrl.errors import UsageError
from graphrl.graph import ModelDecl


def read_architecture(decl: ModelDecl, config: Any) -> Any:
    """The Architecture of the HF module's own config (a checkpoint's, not one rebuilt
    from ModelSpec), refused (UsageError naming model, engine and feature) when it asks
    for anything this engine does not implement (graphrl.architecture.ENGINE_FEATURES)."""
    from graphrl.architecture import architecture, refuse_unsupported

    try:
        arch = architecture(config.to_dict())
    except ValueError as e:
        raise UsageError(f"model {decl.name}: engine megatron: {e}") from None
    refuse_unsupported(decl.name, "megatron", arch)
    return arch


def rope_inv_freq(rope: Any, arch: Any) -> torch.Tensor:
    """The rotary inverse frequencies of `arch` on megatron-core's RotaryEmbedding `rope`
    (built with `rotary_base` = rope_theta, unscaled). rope_type llama3 rescales them by
    the Llama 3.1 rule (Meta's Llama 3.1 release, `apply_scaling`; the formula HF
    publishes in modeling_rope_utils `_compute_llama3_parameters`): with wavelength
    w = 2*pi / f and L = original_max_position_embeddings, f stays if w < L / high_freq_factor,
    becomes f / factor if w > L / low_freq_factor, else (1 - a) f / factor + a f with
    a = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor).
    megatron-core 0.16.1's RotaryEmbedding applies that rule only with its defaults for
    low/high_freq_factor (1, 4) and L (8192): its `_apply_scaling` is called here with the
    checkpoint's own four parameters instead."""
    scaling = dict(arch.rope_scaling)
    if not scaling:
        return rope.inv_freq
    if scaling.get("rope_type") != "llama3":   # refused before (ENGINE_FEATURES)
        raise UsageError(f"megatron: rope_type {scaling.get('rope_type')} is not implemented")
    return rope._apply_scaling(
        rope.inv_freq, factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=float(scaling["original_max_position_embeddings"]))


class BiasedRow:
    """megatron-core's RowParallelLinear with a bias whatever `add_bias_linear` says: Llama's
    attention_bias (q, k, v, o biases; MLP without) and mlp_bias (gate, up, down biases;
    o without) bias some of the linears megatron's config covers together. The bias is
    added once after the tensor-parallel reduction (replicated; under sequence
    parallelism marked `sequence_parallel`, its gradient summed over tp)."""

    def __new__(cls, *args: Any, bias: bool = False, **kw: Any) -> nn.Module:
        from megatron.core.tensor_parallel.layers import RowParallelLinear

        return RowParallelLinear(*args, bias=True, **kw)


class BiasedColumn:
    """ColumnParallelLinear with a bias (mlp_bias: linear_fc1's, split with its rows)."""

    def __new__(cls, *args: Any, bias: bool = False, **kw: Any) -> nn.Module:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear

        return ColumnParallelLinear(*args, bias=True, **kw)


__all__ = ["read_architecture", "rope_inv_freq", "BiasedRow", "BiasedColumn"]
