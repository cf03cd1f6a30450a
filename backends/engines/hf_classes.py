"""Which transformers class builds a model, and the config graphrl runs it with: shared
by the hf engine (hf.py), checkpoint loading and saving (hf_checkpoint.py) and the Ray
workers' sharded engines (imports transformers on first use)."""
from __future__ import annotations

from typing import Any

SCALAR_HEADS = {  # head -> (HF class suffix, the attribute holding the head's Linear)
    "value": "ForTokenClassification",      # a scalar per token: a critic
    "score": "ForSequenceClassification",   # a scalar per sequence: a reward model
}


def hf_class(spec: Any, auto: bool = False) -> Any:
    """The transformers class of a model with this head: a causal LM for `lm`, token
    classification (one label) for `value`, sequence classification (one label) for
    `score`; `auto` picks the Auto class (a checkpoint's own architecture)."""
    import transformers

    suffix = "ForCausalLM" if spec.head == "lm" else SCALAR_HEADS[spec.head]
    if auto:
        return getattr(transformers, "AutoModel" + suffix)
    if spec.family == "gpt2":
        return getattr(transformers, "GPT2LMHeadModel" if spec.head == "lm" else "GPT2" + suffix)
    return getattr(transformers, HF_PREFIX[spec.model_type] + suffix)


HF_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def inference_config(config: Any, head: str) -> Any:
    """The config as graphrl runs it: SDPA attention, no dropout (RL needs the same
    function in every pass), one label for scalar heads."""
    config._attn_implementation = "sdpa"
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout",
                "classifier_dropout", "hidden_dropout", "summary_first_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    if head != "lm":
        config.num_labels = 1
    return config


__all__ = ["SCALAR_HEADS", "HF_PREFIX", "hf_class", "inference_config"]
