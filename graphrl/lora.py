"""LoRA: low-rank adapters trained in place of a model's weights.

A target linear W (out x in) of every decoder layer computes W x + (alpha / r) B A x
(Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. (3)), A (r x
in) and B (out x r) trained, W frozen; B starts at zero, so before the first step the
model is exactly its base. What this changes for a plan:
- training keeps weight gradients and Adam state for the adapters only (r * (in + out)
  parameters per target), while activation gradients still flow through the base;
- the weights that move from training to generation are the adapters (the base never
  changes, generation holds it already);
- a reference model that starts as the policy is the policy's base: a forward on the
  policy's own weights with its adapters switched off, no second copy.

`LoRA` is the spec (pure data, no torch or peft); it travels inside the model's
ModelSpec, so the plan prints it, parses it back and prices it. The engines apply it
through `peft` (backends/engines/lora_hf.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

def _llama_linears(s: Any) -> dict[str, tuple[tuple[int, int], ...]]:
    h, q, kv, ffn = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, \
        s.intermediate_size
    return {"q_proj": ((h, q),), "k_proj": ((h, kv),), "v_proj": ((h, kv),),
            "o_proj": ((q, h),), "gate_proj": ((h, ffn),), "up_proj": ((h, ffn),),
            "down_proj": ((ffn, h),)}


def _gpt2_linears(s: Any) -> dict[str, tuple[tuple[int, int], ...]]:
    h, ffn = s.hidden_size, s.intermediate_size
    return {"c_attn": ((h, 3 * h),), "c_proj": ((h, h), (ffn, h)), "c_fc": ((h, ffn),)}


# family -> (spec -> target module name -> (in, out) features of each of its linears in
# one decoder layer); GPT-2's c_proj names both the attention and the MLP output
LINEARS = {"llama": _llama_linears, "gpt2": _gpt2_linears}
DEFAULT_TARGETS = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",)}


@dataclass(frozen=True)
class LoRA:
    """r: the rank (> 0); alpha: the scale numerator (the update is (alpha / r) B A);
    targets: module names of the decoder layers' linears (llama family: q_proj, k_proj,
    v_proj, o_proj, gate_proj, up_proj, down_proj; gpt2: c_attn, c_proj, c_fc), () for
    the family's default (q_proj, v_proj / c_attn); dropout: on the adapters' input while
    training; adapter: an existing PEFT adapter directory to continue training from
    (its r, alpha and targets must be these)."""

    r: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ()
    dropout: float = 0.0
    adapter: str = ""

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        object.__setattr__(self, "targets", tuple(targets))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise UsageError(f"LoRA r={self.r!r}: the rank must be an int > 0")
        if self.alpha <= 0:
            raise UsageError(f"LoRA alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"LoRA dropout={self.dropout!r}: must be in [0, 1)")
        if not all(isinstance(t, str) and t for t in self.targets):
            raise UsageError(f"LoRA targets={self.targets!r}: module names, e.g. "
                             "('q_proj', 'v_proj')")
        if len(set(self.targets)) != len(self.targets):
            raise UsageError(f"LoRA targets={','.join(self.targets)}: a module is named twice")

    @property
    def scale(self) -> float:
        """alpha / r, the factor of B A (Hu et al. 2021 §4.1)."""
        return self.alpha / self.r

    def targets_for(self, family: str) -> tuple[str, ...]:
        return self.targets or DEFAULT_TARGETS[family]

    def check(self, spec: Any, where: str) -> None:
        """UsageError when a target is not a linear of `spec`'s family (with the nearest
        name) or r exceeds a target's smaller side."""
        from .nearest import suggest

        linears = LINEARS[spec.family](spec)
        for t in self.targets_for(spec.family):
            if t not in linears:
                raise UsageError(f"{where}: LoRA target {t!r} is not a linear of a "
                                 f"{spec.family}-family model{suggest(t, list(linears))} "
                                 f"(its linears: {', '.join(linears)})")
            small = min(min(shape) for shape in linears[t])
            if self.r > small:
                raise UsageError(f"{where}: LoRA r={self.r} exceeds {t}'s smaller side "
                                 f"{small} (a rank-{self.r} update of it is not low-rank)")

    def num_params(self, spec: Any) -> int:
        """Trained parameters: r * (in + out) per target linear per layer."""
        linears = LINEARS[spec.family](spec)
        per_layer = sum(self.r * (i + o) for t in self.targets_for(spec.family)
                        for i, o in linears.get(t, ()))
        return per_layer * spec.num_layers

    # -- text ---------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"r": self.r, "alpha": self.alpha,
                               "targets": list(self.targets), "dropout": self.dropout}
        if self.adapter:
            out["adapter"] = self.adapter
        return out

    def text(self) -> str:
        """A JSON object, as the model spec prints it (parser.py reads it back)."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any) -> "LoRA":
        if not isinstance(d, dict) or not set(d) <= {"r", "alpha", "targets", "dropout",
                                                     "adapter"}:
            raise ValueError(f"a LoRA object has r, alpha, targets, dropout, adapter: {d!r}")
        return cls(int(d.get("r", 16)), d.get("alpha", 32.0), tuple(d.get("targets", ())),
                   d.get("dropout", 0.0), str(d.get("adapter", "")))


def is_adapter_tensor(name: str) -> bool:
    """A state-dict name of a LoRA adapter tensor (peft's `...lora_A.<adapter>.weight`,
    `...lora_B.<adapter>.weight`): what a training-to-generation sync moves."""
    return ".lora_A." in name or ".lora_B." in name


def parse_lora_option(text: str) -> tuple[str, LoRA]:
    """`ROLE:r=16,alpha=32,targets=q_proj,v_proj,dropout=0.05,adapter=DIR` (the --lora
    option) -> (role, LoRA); a bare ROLE takes the defaults. Names after targets= up to
    the next key=value are its targets."""
    flag = f"--lora {text}"
    role, _, rest = text.partition(":")
    if not role:
        raise UsageError(f"{flag}: expected ROLE[:r=R,alpha=A,targets=M1,M2,dropout=D,"
                         "adapter=DIR], e.g. policy:r=16,alpha=32,targets=q_proj,v_proj")
    kw: dict[str, Any] = {}
    last = ""
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            if last != "targets":
                raise UsageError(f"{flag}: {item!r} is not KEY=VALUE")
            kw["targets"].append(item)
            continue
        if key not in ("r", "alpha", "targets", "dropout", "adapter") or key in kw:
            raise UsageError(f"{flag}: unknown or repeated key {key!r} (keys: r, alpha, "
                             "targets, dropout, adapter)")
        last = key
        try:
            kw[key] = {"r": int, "alpha": float, "dropout": float, "adapter": str,
                       "targets": lambda v: [v]}[key](value)
        except ValueError:
            raise UsageError(f"{flag}: {key}={value!r} is not a number") from None
    if "targets" in kw:
        kw["targets"] = tuple(kw["targets"])
    return role, LoRA(**kw)


def check_save_target(path: str, models: Any) -> None:
    """--save of a run whose policy trains LoRA adapters writes a PEFT adapter directory:
    refuse a directory that holds a full model (config.json without adapter_config.json)
    before any work."""
    from pathlib import Path

    if not any(getattr(m, "lora", None) is not None and m.trainable for m in models):
        return
    out = Path(path)
    if (out / "config.json").is_file() and not (out / "adapter_config.json").is_file():
        raise UsageError(f"--save {path}: holds a full model (config.json, no "
                         "adapter_config.json); a LoRA run saves a PEFT adapter directory "
                         "there: choose another directory (or --save-merged for a full "
                         "model)")


def apply_lora(models: tuple[Any, ...], given: dict[str, LoRA]) -> tuple[Any, ...]:
    """graphrl.Models with `given` (model name -> LoRA, from --lora) applied. A frozen lm
    model that starts as a model with fresh adapters (no adapter directory to load) --
    init_from it, or loaded from the same model directory -- becomes its shared base: the
    adapters start at B = 0, so the base *is* that model's initial function, and it
    needs no copy of its own."""
    from dataclasses import replace

    out = [replace(m, lora=given[m.name]) if m.name in given else m for m in models]
    fresh = [m for m in out if m.lora is not None and not m.lora.adapter]

    def owner(m: Any) -> str:
        if m.trainable or m.head != "lm" or m.shares_base:
            return ""
        return next((f.name for f in fresh if m.init_from == f.name or (
            m.checkpoint is not None and m.checkpoint == f.checkpoint)), "")
    return tuple(replace(m, init_from="", shares_base=owner(m)) if owner(m) else m
                 for m in out)


__all__ = ["LoRA", "LINEARS", "DEFAULT_TARGETS", "parse_lora_option", "is_adapter_tensor", "apply_lora",
           "check_save_target"]
