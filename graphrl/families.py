"""Tiny configs of the model families graphrl checks every engine against (the
conformance matrix, `graphrl check-model`, docs/models.md), and a random checkpoint of
one, built in code: no hub, no download.

Each config is shaped like its family's released checkpoints in what changes the
function (biases, norms, rotary scaling, head_dim, tied embeddings, GQA) and small enough
for a CPU test; heads, kv heads and layers divide by 2 so tp=2 and pp=2 run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

_LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)

TINY: Mapping[str, Mapping[str, Any]] = {
    # Llama-2: plain rotary (theta 1e4), no biases.
    "llama2": dict(_LLAMA, model_type="llama", rope_parameters=dict(
        rope_type="default", rope_theta=10000.0)),
    # Llama-3.x: rope_type llama3 (frequency-dependent scaling, Llama 3.1 release),
    # theta 5e5; original_max_position_embeddings small so the scaling shows at 100 tokens.
    "llama3": dict(_LLAMA, model_type="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16)),
    # Mistral (v0.3 style: full attention, no sliding window).
    "mistral": dict(_LLAMA, model_type="mistral", sliding_window=None,
                    rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    # Qwen2 / Qwen2.5: q/k/v biases, tied embeddings (the small Qwen2.5 checkpoints).
    "qwen2": dict(_LLAMA, model_type="qwen2", tie_word_embeddings=True,
                  use_sliding_window=False, rope_parameters=dict(
                      rope_type="default", rope_theta=1000000.0)),
    # Qwen3: RMSNorm of q and k per head, head_dim (16) != hidden / heads (8).
    "qwen3": dict(_LLAMA, model_type="qwen3", head_dim=16, attention_bias=False,
                  tie_word_embeddings=True, use_sliding_window=False,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    # GPT-2: LayerNorm, tanh-GELU, learned positions, biases everywhere, tied.
    "gpt2": dict(model_type="gpt2", vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                 n_inner=64, n_positions=128, activation_function="gelu_new",
                 layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=None,
                 eos_token_id=None),
}


def tiny_config(family: str) -> dict[str, Any]:
    """A copy of the tiny config of `family` (a key of TINY)."""
    try:
        return dict(TINY[family])
    except KeyError:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(TINY)})") from None


def save_random_checkpoint(config: Mapping[str, Any], directory: str | Path, *,
                           seed: int = 0, scale: float = 0.2) -> Path:
    """A causal-LM checkpoint of `config` with random weights in `directory`
    (config.json + model.safetensors). Every parameter, biases and norm weights included,
    gets N(0, scale) noise on top of the HF init, so a feature an engine dropped (a bias,
    a norm, a scaling) changes log-probs visibly. Imports torch and transformers."""
    import torch
    import transformers

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


__all__ = ["TINY", "tiny_config", "save_random_checkpoint"]
