"""What a Hugging Face config asks of an engine: every field of config.json is either read
by graphrl (an architecture feature below), known to be neutral (metadata, token ids,
generation defaults, dropout that graphrl turns off), or refused. A field nobody listed
here is refused by name, so a new field in a future config is never silently ignored.

`Architecture` is the part of a config that changes the function a model computes beyond
the basic block of its family (Llama: RMSNorm, SwiGLU, rotary; GPT-2: LayerNorm, GELU,
learned positions). `features()` names what is present; `ENGINE_FEATURES` says which
engines implement each; `refuse_unsupported` is the one check every engine and the
pre-launch verification use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import UsageError

# model_type -> block family
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
            "gpt2": "gpt2"}

# Fields that never change the computed function (or that graphrl sets itself: dropout is
# off in every pass, generation takes its own sampling arguments).
NEUTRAL = frozenset({
    "_name_or_path", "architectures", "transformers_version", "model_type", "dtype",
    "torch_dtype", "use_bfloat16", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "id2label", "label2id", "num_labels",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "return_dict", "output_attentions", "output_hidden_states", "output_scores",
    "return_dict_in_generate", "torchscript", "use_cache", "initializer_range",
    "chunk_size_feed_forward", "pruned_heads", "tf_legacy_loss", "tie_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop",
    "summary_first_dropout", "classifier_dropout", "hidden_dropout", "pretraining_tp",
    # GPT-2's double-heads summary (not a causal-LM / classification head graphrl builds)
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    # GPT-2's upcast of attention scores: numerics only
    "reorder_and_upcast_attn", "n_ctx",
})

# Fields read into `Architecture` or ModelSpec, per family.
READ = {
    "llama": frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
        "rms_norm_eps", "hidden_act", "tie_word_embeddings", "head_dim", "attention_bias",
        "mlp_bias", "rope_parameters", "rope_scaling", "rope_theta", "sliding_window",
        "use_sliding_window", "max_window_layers", "layer_types", "is_encoder_decoder"}),
    "gpt2": frozenset({
        "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
        "activation_function", "layer_norm_epsilon", "tie_word_embeddings",
        "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention",
        "is_encoder_decoder"}),
}

# Feature -> what it is (for error messages and docs/models.md).
FEATURES = {
    "qkv_bias": "biases on the q/k/v projections (Qwen2, attention_bias)",
    "o_bias": "a bias on the attention output projection (attention_bias)",
    "mlp_bias": "biases on the MLP projections (mlp_bias)",
    "qk_norm": "RMSNorm of queries and keys per head (Qwen3)",
    "head_dim": "head_dim different from hidden_size / num_attention_heads",
    "rope_llama3": "Llama-3.x rotary frequency scaling (rope_type llama3)",
    "rope_scaling": "a rotary scaling other than llama3 (linear, dynamic, yarn, ...)",
    "sliding_window": "sliding-window attention shorter than the context",
    "activation": "an MLP activation other than the family's (silu / tanh-gelu)",
    "lora": "LoRA adapters (graphrl.lora; run through peft on the Hugging Face module, "
            "also under DeepSpeed ZeRO, and not implemented on megatron-core's "
            "tensor-parallel linears)",
}
ALL_FEATURES = frozenset(FEATURES)

# engine -> the features it implements. hf and deepspeed run the Hugging Face module
# itself; fast generates on graphrl's own decode model (docs/generation.md);
# megatron converts the weights into megatron-core's GPTModel.
ENGINE_FEATURES = {
    "hf": ALL_FEATURES,
    "deepspeed": ALL_FEATURES,   # LoRA: peft under ZeRO, adapters-only optimizer
    "fast": frozenset({"qkv_bias", "o_bias", "mlp_bias", "head_dim", "qk_norm", "rope_llama3",
                       "sliding_window", "lora"}),
    "megatron": frozenset("qkv_bias o_bias mlp_bias qk_norm head_dim rope_llama3".split()),
}


@dataclass(frozen=True)
class Architecture:
    """The function-changing fields of a config beyond the family's basic block."""

    model_type: str
    family: str
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()   # sorted items; () = plain rotary
    sliding_window: int = 0                          # 0 = full attention in every layer
    activation: str = ""
    head_dim_differs: bool = False                   # head_dim * heads != hidden_size
    lora: bool = False                               # LoRA adapters (graphrl.lora)

    def features(self) -> dict[str, str]:
        """feature -> the config field and value that asks for it."""
        out: dict[str, str] = {}
        if self.qkv_bias:
            out["qkv_bias"] = ("model_type=qwen2" if self.model_type == "qwen2"
                               else "attention_bias=true")
        if self.o_bias:
            out["o_bias"] = "attention_bias=true"
        if self.mlp_bias:
            out["mlp_bias"] = "mlp_bias=true"
        if self.qk_norm:
            out["qk_norm"] = f"model_type={self.model_type}"
        if self.family == "llama" and self.head_dim_differs:
            out["head_dim"] = f"head_dim={self.head_dim}"
        kind = dict(self.rope_scaling).get("rope_type", "default")
        if kind == "llama3":
            out["rope_llama3"] = "rope_type=llama3"
        elif kind != "default":
            out["rope_scaling"] = f"rope_type={kind}"
        if self.sliding_window:
            out["sliding_window"] = f"sliding_window={self.sliding_window}"
        if self.activation:
            out["activation"] = f"activation={self.activation}"
        if self.lora:
            out["lora"] = "gr.Model(lora=...) / --lora"
        return out


def _rope(config: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(theta, scaling items) from transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` pair."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise ValueError("rope_parameters / rope_scaling must be JSON objects")
    params = {**legacy, **params}
    theta = params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind == "default":
        return float(theta), ()
    return float(theta), tuple(sorted({"rope_type": kind, **params}.items()))


def _window(config: Mapping[str, Any], model_type: str) -> int:
    """The sliding window that applies to some layer, or 0."""
    # MistralConfig's default window (4096) applies when config.json has no such field
    window = config.get("sliding_window", 4096 if model_type == "mistral" else None)
    if model_type in ("qwen2", "qwen3"):
        types = config.get("layer_types")
        if types is not None:
            if not isinstance(types, list) or any(
                    t not in ("full_attention", "sliding_attention") for t in types):
                raise ValueError("layer_types must list 'full_attention' / "
                                 "'sliding_attention' per layer")
            if len(types) != config.get("num_hidden_layers"):
                raise ValueError(f"layer_types lists {len(types)} layers, "
                                 f"num_hidden_layers is {config.get('num_hidden_layers')}")
            return int(window or 0) if "sliding_attention" in types else 0
        if not config.get("use_sliding_window"):
            return 0
    if window is None or (isinstance(window, int) and not isinstance(window, bool)
                          and window >= config.get("max_position_embeddings", 1 << 62)):
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer or null, got {window!r}")
    return window


def unknown_fields(config: Mapping[str, Any]) -> list[str]:
    """Fields of `config` graphrl neither reads nor knows to be neutral."""
    family = FAMILIES.get(config.get("model_type", "llama"), "llama")
    return sorted(k for k in config if k not in NEUTRAL and k not in READ[family])


def architecture(config: Mapping[str, Any]) -> Architecture:
    """The Architecture of a config dict (config.json, or a transformers config's
    `to_dict()`); ValueError naming the field for anything graphrl cannot read."""
    model_type = config.get("model_type", "llama")
    family = FAMILIES[model_type]
    unknown = unknown_fields(config)
    if unknown:
        raise ValueError(f"config field{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                         f"{'are' if len(unknown) > 1 else 'is'} not read by graphrl (a "
                         f"{model_type} config has no such field in the versions graphrl "
                         "knows); refusing rather than ignoring it")
    if config.get("is_encoder_decoder"):
        raise ValueError("is_encoder_decoder=true: graphrl runs decoder-only models")
    if family == "gpt2":
        if config.get("add_cross_attention"):
            raise ValueError("add_cross_attention=true: graphrl runs decoder-only models")
        act = config.get("activation_function", "gelu_new")
        h, heads = config["n_embd"], config["n_head"]
        return Architecture(model_type, family, h // heads, activation=(
            "" if act in ("gelu_new", "gelu_pytorch_tanh", "gelu") else str(act)))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    # Qwen3Config's default head_dim is 128, whatever hidden / heads is
    head_dim = config.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    bias = bool(config.get("attention_bias", False))
    theta, scaling = _rope(config)
    act = config.get("hidden_act", "silu")
    return Architecture(
        model_type, family, head_dim,
        qkv_bias=bias or model_type == "qwen2", o_bias=bias,
        mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
        rope_theta=theta, rope_scaling=scaling, sliding_window=_window(config, model_type),
        activation="" if act == "silu" else str(act),
        head_dim_differs=head_dim * heads != hidden)


def missing_features(engine: str, arch: Architecture) -> dict[str, str]:
    """feature -> config field, for each feature of `arch` that `engine` lacks."""
    have = ENGINE_FEATURES.get(engine, frozenset())
    return {f: src for f, src in arch.features().items() if f not in have}


def refuse_unsupported(model: str, engine: str, arch: Architecture) -> None:
    """UsageError naming the model, the engine and each feature it lacks."""
    missing = missing_features(engine, arch)
    if not missing:
        return
    able = [e for e, have in ENGINE_FEATURES.items() if set(arch.features()) <= have]
    what = "; ".join(f"{FEATURES[f]} ({src})" for f, src in missing.items())
    raise UsageError(f"model {model}: engine {engine} cannot run this {arch.model_type} "
                     f"model: it does not implement {what}. Engines that can: "
                     f"{', '.join(able) or 'none'}")


__all__ = ["Architecture", "FAMILIES", "FEATURES", "ENGINE_FEATURES", "NEUTRAL", "READ",
           "architecture", "unknown_fields", "missing_features", "refuse_unsupported"]
