"""Value types of the IR: payload specs (what flows on an edge) and model specs.

Everything here is a frozen dataclass of plain numbers and strings, so that graphs print,
parse, hash and compare equal. No torch here: sizes are computed from shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

# Bytes per element of the dtypes payloads and weights use.
DTYPE_BYTES = {"bool": 1, "i32": 4, "i64": 8, "f16": 2, "bf16": 2, "f32": 4}

WEIGHTS = "Weights"


@dataclass(frozen=True)
class Field:
    """One tensor of a payload: shape [batch] or [batch, seq] (per_token)."""

    name: str
    dtype: str
    per_token: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"field {self.name!r}: unknown dtype {self.dtype!r} "
                             f"(known: {', '.join(DTYPE_BYTES)})")

    def shape(self, batch: int, seq: int) -> tuple[int, ...]:
        return (batch, seq) if self.per_token else (batch,)

    def text(self) -> str:
        return f"{self.name}:{self.dtype}{'[s]' if self.per_token else ''}"


@dataclass(frozen=True)
class PayloadSpec:
    """The type of a value on an edge.

    `kind` names what it is (Prompts, Rollout, LogProbs, Values, Scores, Advantages,
    Stats, Weights...). Data payloads have a batch, a sequence length and typed fields;
    a Weights payload names its model and carries the model's weight bytes.
    """

    kind: str
    batch: int = 0
    seq: int = 0
    fields: tuple[Field, ...] = ()
    model: str = ""          # for Weights: whose weights
    weight_bytes: int = 0    # for Weights: total bytes of the model's weights

    @property
    def is_weights(self) -> bool:
        return self.kind == WEIGHTS

    @property
    def nbytes(self) -> int:
        if self.is_weights:
            return self.weight_bytes
        return sum(DTYPE_BYTES[f.dtype] * (self.seq if f.per_token else 1) * self.batch
                   for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.kind} has no field {name!r}")

    def with_batch(self, batch: int) -> "PayloadSpec":
        return replace(self, batch=batch)

    def text(self) -> str:
        if self.is_weights:
            return f"{WEIGHTS}[{self.model}, bytes={self.weight_bytes}]"
        fields = ", ".join(f.text() for f in self.fields)
        return f"{self.kind}[{self.batch}, seq={self.seq}]{{{fields}}}"


def weights_spec(model: str, spec: "ModelSpec") -> PayloadSpec:
    return PayloadSpec(WEIGHTS, model=model, weight_bytes=spec.weight_bytes)


HEADS = ("lm", "value", "score")
FAMILIES = ("llama", "gpt2")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only transformer plus the head it ends in.

    `head`: lm (next-token logits: generate, log-probs), value (a scalar per token: a
    critic) or score (a scalar per sequence: a reward model).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int
    head: str = "lm"
    tie_embeddings: bool = False
    dtype: str = "bf16"     # dtype of the weights as served (generation / inference)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r} (known: {', '.join(FAMILIES)})")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r} (known: {', '.join(HEADS)})")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size} / heads {self.num_heads} / "
                             f"kv_heads {self.num_kv_heads} do not divide")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def params_per_layer(self) -> int:
        h, ffn = self.hidden_size, self.intermediate_size
        kv = self.num_kv_heads * self.head_dim
        if self.family == "llama":   # q, o: h*h; k, v: h*kv; SwiGLU: 3 h*ffn; 2 RMSNorms
            return 2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h
        # gpt2: fused qkv + proj with biases, 2-matrix MLP with biases, 2 LayerNorms
        return (h * (h + 2 * kv) + (h + 2 * kv)) + (h * h + h) + (2 * h * ffn + ffn + h) + 4 * h

    @property
    def num_params(self) -> int:
        h, v = self.hidden_size, self.vocab_size
        embed = v * h + (self.max_positions * h if self.family == "gpt2" else 0)
        final_norm = h if self.family == "llama" else 2 * h
        if self.head == "lm":
            head = 0 if self.tie_embeddings else v * h
        else:
            head = h + 1
        return embed + self.num_layers * self.params_per_layer + final_norm + head

    @property
    def weight_bytes(self) -> int:
        return self.num_params * DTYPE_BYTES[self.dtype]

    def text(self) -> str:
        return (f"{self.family}{{vocab={self.vocab_size}, hidden={self.hidden_size}, "
                f"layers={self.num_layers}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"ffn={self.intermediate_size}, ctx={self.max_positions}, head={self.head}, "
                f"tied={int(self.tie_embeddings)}, dtype={self.dtype}}}")

    # -- Hugging Face configs ---------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any, head: str = "lm") -> "ModelSpec":
        """From a transformers config object or its dict (config.json contents)."""
        from .model_config import check_hf_config

        c = check_hf_config(config if isinstance(config, Mapping) or not hasattr(
            config, "to_dict") else config.to_dict())
        model_type = c.get("model_type", "llama")
        if model_type == "gpt2":
            h = c["n_embd"]
            return cls("gpt2", c["vocab_size"], h, c["n_layer"], c["n_head"], c["n_head"],
                       c.get("n_inner") or 4 * h, c["n_positions"], head,
                       bool(c.get("tie_word_embeddings", True)))
        if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"unsupported model_type {model_type!r}: graphrl knows llama- and "
                             "gpt2-shaped configs")
        heads = c["num_attention_heads"]
        return cls("llama", c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], heads,
                   c.get("num_key_value_heads") or heads, c["intermediate_size"],
                   c.get("max_position_embeddings", 2048), head,
                   bool(c.get("tie_word_embeddings", False)))

    def hf_config_dict(self) -> dict[str, Any]:
        if self.family == "gpt2":
            return dict(model_type="gpt2", vocab_size=self.vocab_size, n_embd=self.hidden_size,
                        n_layer=self.num_layers, n_head=self.num_heads,
                        n_inner=self.intermediate_size, n_positions=self.max_positions,
                        tie_word_embeddings=self.tie_embeddings, bos_token_id=None,
                        eos_token_id=None)
        return dict(model_type="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                    num_key_value_heads=self.num_kv_heads,
                    intermediate_size=self.intermediate_size,
                    max_position_embeddings=self.max_positions,
                    tie_word_embeddings=self.tie_embeddings, bos_token_id=None,
                    eos_token_id=None, pad_token_id=None)

    def hf_config(self) -> Any:
        """A transformers config object (imports transformers)."""
        import transformers

        d = self.hf_config_dict()
        cls = transformers.GPT2Config if d.pop("model_type") == "gpt2" else transformers.LlamaConfig
        return cls(**d)


def llama2(size: str, head: str = "lm", vocab_size: int = 32000) -> ModelSpec:
    """Llama-2-shaped presets (Touvron et al. 2023, Table 1 / the released configs).
    A `-Nk` suffix (`7b-32k`) gives the same shape an N x 1024-token context, as long-
    context fine-tunes with RoPE scaling do (Code Llama, Roziere et al. 2023 §2.4)."""
    size, _, ctx = size.lower().partition("-")
    try:
        context = (int(ctx[:-1]) * 1024 if ctx.endswith("k") else int(ctx)) if ctx else 4096
        if context < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"bad context suffix {ctx!r} in model size (e.g. 7b-32k)") from None
    shapes = {  # hidden, layers, heads, kv_heads, ffn
        "7b": (4096, 32, 32, 32, 11008),
        "13b": (5120, 40, 40, 40, 13824),
        "34b": (8192, 48, 64, 8, 22016),   # Code Llama 34B shape (Llama-2 family, GQA)
        "70b": (8192, 80, 64, 8, 28672),
    }
    try:
        h, layers, heads, kv, ffn = shapes[size.lower()]
    except KeyError:
        raise ValueError(f"unknown model size {size!r} (known: {', '.join(shapes)})") from None
    return ModelSpec("llama", vocab_size, h, layers, heads, kv, ffn, context, head)


def field_tuple(*fields: tuple[str, str, bool]) -> tuple[Field, ...]:
    return tuple(Field(n, d, t) for n, d, t in fields)


__all__ = ["DTYPE_BYTES", "Field", "PayloadSpec", "ModelSpec", "weights_spec", "llama2",
           "HEADS", "FAMILIES", "WEIGHTS", "field_tuple"]
