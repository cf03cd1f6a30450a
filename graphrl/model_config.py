"""Schema check of a Hugging Face config.json (the fields graphrl reads): each error names
the field, what it must be and what it is. Other fields are left alone (HF configs carry
many graphrl does not use)."""
from __future__ import annotations

from typing import Any, Mapping

from .nearest import suggest

FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
            "gpt2": "gpt2"}

# family -> (required positive-int fields, optional positive-int fields)
FIELDS = {
    "llama": (("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size"), ("num_key_value_heads", "max_position_embeddings")),
    "gpt2": (("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"), ("n_inner",)),
}
BOOL_FIELDS = ("tie_word_embeddings",)


def _describe(v: Any) -> str:
    if isinstance(v, (bool, int, float)) or v is None:
        return repr(v)
    return f"a {type(v).__name__}"


def check_hf_config(config: Any) -> Mapping[str, Any]:
    """`config` (parsed config.json) if graphrl can read it; ValueError naming the field."""
    if not isinstance(config, Mapping):
        raise ValueError(f"expected a JSON object of config fields, got {_describe(config)}")
    model_type = config.get("model_type", "llama")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        hint = suggest(model_type, FAMILIES) if isinstance(model_type, str) else ""
        raise ValueError(f"model_type {model_type!r} is not supported{hint} (graphrl reads "
                         f"{', '.join(FAMILIES)})" if isinstance(model_type, str) else
                         f"model_type must be a string, got {_describe(model_type)}")
    family = FAMILIES[model_type]
    required, optional = FIELDS[family]
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{model_type} config lacks {', '.join(missing)}")
    for k in required + optional:
        v = config.get(k)
        if v is None and k in optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{k} must be an integer, got {_describe(v)}")
        if v < 1:
            raise ValueError(f"{k} must be >= 1, got {v}")
    for k in BOOL_FIELDS:
        if k in config and config[k] is not None and not isinstance(config[k], bool):
            raise ValueError(f"{k} must be true or false, got {_describe(config[k])}")
    hidden, heads = ((config["n_embd"], config["n_head"]) if family == "gpt2" else
                     (config["hidden_size"], config["num_attention_heads"]))
    if hidden % heads:
        raise ValueError(f"{'n_embd' if family == 'gpt2' else 'hidden_size'} {hidden} is not "
                         f"divisible by the {heads} attention heads")
    kv = config.get("num_key_value_heads") if family == "llama" else None
    if kv is not None and heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not divisible by "
                         f"num_key_value_heads {kv}")
    return config


def load_hf_config(path: str) -> Mapping[str, Any]:
    """Read and check config.json at `path`; ValueError naming the file and the field."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    try:
        return check_hf_config(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


__all__ = ["check_hf_config", "load_hf_config", "FAMILIES"]
