"""Value types of the IR: payload specs (what flows on an edge) and model specs.

Everything here is a frozen dataclass of plain numbers and strings, so that graphs print,
parse, hash and compare equal. No torch here: sizes are computed from shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

# Bytes per element of the dtypes payloads and weights use.
DTYPE_BYTES = {"bool": 1, "i32": 4, "i64": 8, "f16": 2, "bf16": 2, "f32": 4, "fp32": 4}
# A model's precision (ModelSpec.dtype, the one place the plan keeps it): "bf16" mixed
# precision (bf16 compute and activations, fp32 master weights and Adam state when it
# trains; a frozen model holds bf16 weights only) or "fp32" throughout.
PRECISIONS = ("bf16", "fp32")

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
# transformers' default norm epsilon per family (LlamaConfig / MistralConfig / Qwen2Config
# / Qwen3Config rms_norm_eps, GPT2Config layer_norm_epsilon)
NORM_EPS = {"llama": 1e-6, "gpt2": 1e-5}

# The layouts transformers gives each model_type of the llama family (what hf_config_dict
# can rebuild): which of graphrl's architecture fields the HF config can express.
_HF_CAN = {  # model_type -> (attention_bias: q/k/v and o together, mlp_bias, sliding window)
    "llama": (True, True, False),
    "mistral": (False, False, True),
    "qwen2": (False, False, True),    # q/k/v biases always, no o bias (see __post_init__)
    "qwen3": (True, False, True),     # q/k RMSNorm always
}


def _frozen_items(value: Any) -> tuple[tuple[str, Any], ...]:
    """rope_scaling as sorted (key, value) items, lists as tuples (hashable; a JSON
    round trip gives lists back)."""
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items))


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only transformer plus the head it ends in.

    `head`: lm (next-token logits: generate, log-probs), value (a scalar per token: a
    critic) or score (a scalar per sequence: a reward model).

    Beyond the family's basic block (llama: RMSNorm, SwiGLU, rotary; gpt2: LayerNorm,
    GELU, learned positions), the fields after `dtype` say what else changes the function
    or its cost (graphrl.architecture): the HF `model_type` (default: the family's),
    `head_dim` (0 at construction: hidden_size / num_heads), q/k/v and o biases, MLP
    biases, per-head q/k RMSNorm, the rotary base and scaling (sorted items of HF's
    rope_parameters without rope_theta; () = plain rotary), a sliding attention window
    (0 = full attention), a non-default MLP activation ("" = the family's) and the
    norms' epsilon (HF's rms_norm_eps / layer_norm_epsilon).
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
    dtype: str = "bf16"     # the model's precision (PRECISIONS): weights as served, compute
    model_type: str = ""
    head_dim: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    sliding_window: int = 0
    activation: str = ""
    norm_eps: float = 0.0   # 0 at construction: the family's (HF default) epsilon
    lora: Any = None        # a graphrl.lora.LoRA: adapters train, the weights stay frozen

    def __post_init__(self) -> None:
        from .architecture import FAMILIES as TYPES

        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r} (known: {', '.join(FAMILIES)})")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r} (known: {', '.join(HEADS)})")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"unknown precision {self.dtype!r} (allowed: "
                             f"{', '.join(PRECISIONS)})")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("model_type", self.model_type or self.family)
        if TYPES.get(self.model_type) != self.family:
            known = [t for t, f in TYPES.items() if f == self.family]
            raise ValueError(f"model_type {self.model_type!r} is not of the {self.family} "
                             f"family (known: {', '.join(known)})")
        if not self.head_dim and self.num_heads and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} / heads {self.num_heads} do "
                             "not divide (and no head_dim is given)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"heads {self.num_heads} / kv_heads {self.num_kv_heads} do "
                             "not divide")
        set_("head_dim", int(self.head_dim or self.hidden_size // self.num_heads))
        set_("rope_scaling", _frozen_items(self.rope_scaling))
        set_("rope_theta", float(self.rope_theta))
        set_("norm_eps", float(self.norm_eps or NORM_EPS[self.family]))
        if self.model_type == "qwen2":
            set_("qkv_bias", True)
        if self.model_type == "qwen3":
            set_("qk_norm", True)
        self._check_expressible()

    def _check_expressible(self) -> None:
        """ValueError naming the field the model's HF class has no way to express (so
        hf_config_dict rebuilds exactly this function, and a config field transformers
        would ignore is refused instead)."""
        t = self.model_type
        if self.family == "gpt2":
            bad = [k for k in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "rope_scaling",
                               "sliding_window") if getattr(self, k)]
            if bad:
                raise ValueError(f"a gpt2 model has no {', '.join(bad)}")
            return
        attn_bias, mlp_bias, window = _HF_CAN[t]
        if t != "qwen2" and self.qkv_bias != self.o_bias:
            raise ValueError(f"a {t} model has biases on all of q/k/v/o or none "
                             "(attention_bias)")
        if t == "qwen2" and self.o_bias:
            raise ValueError("a qwen2 model has no bias on the attention output projection")
        if (self.o_bias and not attn_bias) or (self.mlp_bias and not mlp_bias):
            raise ValueError(f"a {t} model has no "
                             f"{'attention_bias' if self.o_bias and not attn_bias else 'mlp_bias'}"
                             " in transformers")
        if self.qk_norm and t != "qwen3":
            raise ValueError(f"a {t} model has no q/k norm")
        if self.sliding_window and not window:
            raise ValueError(f"a {t} model has no sliding_window in transformers")

    @property
    def arch(self) -> Any:
        """The graphrl.architecture.Architecture of this model (what engines implement)."""
        from .architecture import Architecture

        return Architecture(self.model_type, self.family, self.head_dim, self.qkv_bias,
                            self.o_bias, self.mlp_bias, self.qk_norm, self.rope_theta,
                            self.rope_scaling, self.sliding_window, self.activation,
                            self.head_dim * self.num_heads != self.hidden_size,
                            self.lora is not None)

    @property
    def params_per_layer(self) -> int:
        h, ffn = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.family == "llama":   # q, o: h*q; k, v: h*kv; SwiGLU: 3 h*ffn; 2 RMSNorms
            return (2 * h * q + 2 * h * kv + 3 * h * ffn + 2 * h
                    + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
                    + (2 * ffn + h if self.mlp_bias else 0)
                    + (2 * self.head_dim if self.qk_norm else 0))   # q_norm, k_norm
        # gpt2: fused qkv + proj with biases, 2-matrix MLP with biases, 2 LayerNorms
        return (h * (h + 2 * kv) + (h + 2 * kv)) + (h * h + h) + (2 * h * ffn + ffn + h) + 4 * h

    @property
    def num_params(self) -> int:
        """Parameters of the HF module (ForCausalLM / ForTokenClassification (value, a
        biased Linear) / ForSequenceClassification (score, no bias))."""
        h, v = self.hidden_size, self.vocab_size
        embed = v * h + (self.max_positions * h if self.family == "gpt2" else 0)
        final_norm = h if self.family == "llama" else 2 * h
        if self.head == "lm":
            head = 0 if self.tie_embeddings else v * h
        else:
            head = h + (self.head == "value")
        return embed + self.num_layers * self.params_per_layer + final_norm + head

    @property
    def weight_bytes(self) -> int:
        return self.num_params * DTYPE_BYTES[self.dtype]

    @property
    def trained_params(self) -> int:
        """Parameters with gradients and optimizer state: the LoRA adapters', or all."""
        return self.lora.num_params(self) if self.lora is not None else self.num_params

    @property
    def sync_bytes(self) -> int:
        """Bytes a training-to-generation weight sync moves: the adapters in the
        model's precision under LoRA (the frozen base is on the generation side
        already), else every weight."""
        return self.trained_params * DTYPE_BYTES[self.dtype]

    def arch_text(self) -> list[str]:
        """`key=value` of each architecture field that differs from the family default
        (parser.py reads them back)."""
        import json

        out = []
        if self.model_type != self.family:
            out.append(f"type={self.model_type}")
        if self.head_dim * self.num_heads != self.hidden_size:
            out.append(f"head_dim={self.head_dim}")
        qwen2, qwen3 = self.model_type == "qwen2", self.model_type == "qwen3"
        out += [f"{k}=1" for k, implied in (("qkv_bias", qwen2), ("o_bias", False),
                                            ("mlp_bias", False), ("qk_norm", qwen3))
                if getattr(self, k) and not implied]
        if self.rope_theta != 10000.0:
            out.append(f"rope_theta={self.rope_theta!r}")
        if self.rope_scaling:
            out.append("rope_scaling=" + json.dumps(dict(self.rope_scaling), sort_keys=True,
                                                    separators=(",", ":")))
        if self.sliding_window:
            out.append(f"window={self.sliding_window}")
        if self.activation:
            out.append(f"act={self.activation}")
        if self.norm_eps != NORM_EPS[self.family]:
            out.append(f"eps={self.norm_eps!r}")
        if self.lora is not None:
            out.append(f"lora={self.lora.text()}")
        return out

    def text(self) -> str:
        extra = "".join(", " + a for a in self.arch_text())
        return (f"{self.family}{{vocab={self.vocab_size}, hidden={self.hidden_size}, "
                f"layers={self.num_layers}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"ffn={self.intermediate_size}, ctx={self.max_positions}, head={self.head}, "
                f"tied={int(self.tie_embeddings)}, dtype={self.dtype}{extra}}}")

    # -- Hugging Face configs ---------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any, head: str = "lm") -> "ModelSpec":
        """From a transformers config object or its dict (config.json contents). Every
        field is audited (graphrl.architecture): ValueError naming one graphrl does not
        read, or an architecture it cannot express."""
        from .architecture import architecture
        from .model_config import check_hf_config

        c = check_hf_config(config if isinstance(config, Mapping) or not hasattr(
            config, "to_dict") else config.to_dict())
        a = architecture(c)
        if a.family == "gpt2":
            for field, plain in (("scale_attn_weights", True),
                                 ("scale_attn_by_inverse_layer_idx", False)):
                if bool(c.get(field, plain)) != plain:   # not 1/sqrt(head_dim)
                    raise ValueError(f"{field}={str(not plain).lower()}: graphrl models "
                                     "GPT-2 attention scaled by 1/sqrt(head_dim) only")
            h = c["n_embd"]
            return cls("gpt2", c["vocab_size"], h, c["n_layer"], c["n_head"], c["n_head"],
                       c.get("n_inner") or 4 * h, c["n_positions"], head,
                       bool(c.get("tie_word_embeddings", True)), activation=a.activation,
                       norm_eps=c.get("layer_norm_epsilon") or NORM_EPS["gpt2"])
        if a.sliding_window and a.model_type in ("qwen2", "qwen3"):
            _all_layers_slide(c)
        heads = c["num_attention_heads"]
        return cls("llama", c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], heads,
                   c.get("num_key_value_heads") or heads, c["intermediate_size"],
                   c.get("max_position_embeddings", 2048), head,
                   bool(c.get("tie_word_embeddings", False)), model_type=a.model_type,
                   head_dim=a.head_dim, qkv_bias=a.qkv_bias, o_bias=a.o_bias,
                   mlp_bias=a.mlp_bias, qk_norm=a.qk_norm, rope_theta=a.rope_theta,
                   rope_scaling=a.rope_scaling, sliding_window=a.sliding_window,
                   activation=a.activation, norm_eps=c.get("rms_norm_eps") or NORM_EPS["llama"])

    def hf_config_dict(self) -> dict[str, Any]:
        """The HF config (as a dict with model_type) of exactly this architecture."""
        if self.family == "gpt2":
            return dict(model_type="gpt2", vocab_size=self.vocab_size, n_embd=self.hidden_size,
                        n_layer=self.num_layers, n_head=self.num_heads,
                        n_inner=self.intermediate_size, n_positions=self.max_positions,
                        tie_word_embeddings=self.tie_embeddings, bos_token_id=None,
                        eos_token_id=None, activation_function=self.activation or "gelu_new",
                        layer_norm_epsilon=self.norm_eps)
        t = self.model_type
        d = dict(model_type=t, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                 num_key_value_heads=self.num_kv_heads,
                 intermediate_size=self.intermediate_size,
                 max_position_embeddings=self.max_positions,
                 tie_word_embeddings=self.tie_embeddings, bos_token_id=None,
                 eos_token_id=None, pad_token_id=None, head_dim=self.head_dim,
                 hidden_act=self.activation or "silu", rms_norm_eps=self.norm_eps,
                 rope_parameters={"rope_type": "default", **dict(self.rope_scaling),
                                  "rope_theta": self.rope_theta})
        if _HF_CAN[t][0]:
            d["attention_bias"] = self.o_bias
        if t == "llama":
            d["mlp_bias"] = self.mlp_bias
        if t == "mistral":   # MistralConfig's default window is 4096: say "none" explicitly
            d["sliding_window"] = self.sliding_window or None
        elif t in ("qwen2", "qwen3"):   # every layer slides (from_hf_config checks that)
            d.update(use_sliding_window=bool(self.sliding_window), max_window_layers=0,
                     sliding_window=self.sliding_window or None)
        return d

    def hf_config(self) -> Any:
        """A transformers config object (imports transformers)."""
        import transformers

        d = self.hf_config_dict()
        return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def _all_layers_slide(c: Mapping[str, Any]) -> None:
    """ValueError unless every layer of a Qwen config with a window slides (transformers:
    layer i slides when i >= max_window_layers, or as `layer_types` says); a ModelSpec
    holds one window for all layers."""
    types = c.get("layer_types")
    if types is None:
        first = c.get("max_window_layers", 28)   # Qwen2Config / Qwen3Config default
        types = ["full_attention" if i < first else "sliding_attention"
                 for i in range(c["num_hidden_layers"])]
    if "full_attention" in types:
        field = "layer_types" if c.get("layer_types") is not None else "max_window_layers"
        raise ValueError(f"{field}: sliding-window attention in only some layers is not "
                         "supported (graphrl models one window for every layer)")


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


__all__ = ["DTYPE_BYTES", "PRECISIONS", "Field", "PayloadSpec", "ModelSpec", "weights_spec",
           "llama2", "HEADS", "FAMILIES", "WEIGHTS", "field_tuple"]
