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
import os
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
# the output head (hidden -> vocab), once per model: a target of either family when its
# weights are not tied to the input embeddings (peft targets it by the same name)
HEAD = "lm_head"
# the other family's module doing the same job (a suggestion for a target given in the
# wrong family's names: GPT-2 fuses q/k/v into c_attn and names both outputs c_proj)
COUNTERPART = {"q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn",
               "o_proj": "c_proj", "gate_proj": "c_fc", "up_proj": "c_fc",
               "down_proj": "c_proj", "c_attn": "q_proj, k_proj, v_proj",
               "c_fc": "gate_proj, up_proj", "c_proj": "o_proj, down_proj"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoRA:
    """r: the rank (> 0); alpha: the scale numerator (the update is (alpha / r) B A);
    targets: module names of the decoder layers' linears (llama family: q_proj, k_proj,
    v_proj, o_proj, gate_proj, up_proj, down_proj; gpt2: c_attn, c_proj, c_fc) and/or
    lm_head (the output head, untied models), () for the family's default (q_proj,
    v_proj / c_attn); dropout: on the adapters' input while training; adapter: an
    existing PEFT adapter directory to continue training from (r, alpha and targets not
    given are its own; given, they must be its own)."""

    r: int = None            # type: ignore[assignment]  # None: 16, or the adapter's
    alpha: float = None      # type: ignore[assignment]  # None: 32, or the adapter's
    targets: tuple[str, ...] = ()
    dropout: float = 0.0
    adapter: str = ""

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        object.__setattr__(self, "targets", tuple(targets))
        if self.adapter and (self.r is None or self.alpha is None or not self.targets) \
                and os.path.isfile(os.path.join(self.adapter, ADAPTER_CONFIG)):
            # continuing from a PEFT adapter directory: what is not given is the adapter's
            # (a missing directory: check() refuses it, naming the model)
            cfg = read_adapter_config(self.adapter, f"LoRA adapter {self.adapter}")
            object.__setattr__(self, "r", cfg["r"] if self.r is None else self.r)
            object.__setattr__(self, "alpha", cfg["lora_alpha"] if self.alpha is None
                               else self.alpha)
            object.__setattr__(self, "targets", self.targets or tuple(cfg["target_modules"]))
        object.__setattr__(self, "r", 16 if self.r is None else self.r)
        object.__setattr__(self, "alpha", 32.0 if self.alpha is None else self.alpha)
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
        name, or the other family's counterpart) or r exceeds a target's smaller side;
        with `adapter`, when the directory was made with another r, alpha or targets, or
        its tensors' shapes are not this model's (made for another base)."""
        from .nearest import suggest

        linears = targets_of(spec)
        if HEAD in self.targets_for(spec.family) and spec.tie_embeddings:
            raise UsageError(f"{where}: LoRA target {HEAD!r}: this model's output head "
                             "is tied to its input embeddings (an adapter on it would "
                             "adapt one and not the other); leave lm_head out")
        for t in self.targets_for(spec.family):
            if t not in linears:
                hint = suggest(t, list(linears))
                if t in COUNTERPART and COUNTERPART[t].split(",")[0] in linears:
                    # another family's name: its counterpart, not the nearest spelling
                    hint = (f" (a {spec.family} model does this in "
                            f"{COUNTERPART[t]})" if "," in COUNTERPART[t] else
                            f" (did you mean {COUNTERPART[t]!r}?)")
                raise UsageError(f"{where}: LoRA target {t!r} is not a linear of a "
                                 f"{spec.family}-family model{hint} "
                                 f"(its linears: {', '.join(linears)})")
            small = min(min(shape) for shape in linears[t])
            if self.r > small:
                raise UsageError(f"{where}: LoRA r={self.r} exceeds {t}'s smaller side "
                                 f"{small} (a rank-{self.r} update of it is not low-rank)")
        if self.adapter:
            self.check_adapter(spec, where)

    def check_adapter(self, spec: Any, where: str) -> None:
        """The adapter directory against this spec and `spec`: its config's r, alpha
        and targets, and (adapter_model.safetensors) each tensor's shape, read from the
        file's header: A is (r, in) and B (out, r) of its target in this model."""
        from pathlib import Path

        where = f"{where}: LoRA adapter {self.adapter}"
        cfg = read_adapter_config(self.adapter, where)
        want = {"r": self.r, "lora_alpha": self.alpha,
                "target_modules": sorted(self.targets_for(spec.family))}
        got = {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
               "target_modules": sorted(cfg["target_modules"])}
        bad = [f"{k} {got[k]} (the spec says {want[k]})" for k in want if got[k] != want[k]]
        if bad:
            raise UsageError(f"{where}: made with " + ", ".join(bad))
        weights = Path(self.adapter) / ADAPTER_WEIGHTS
        if not weights.is_file():
            return   # an older adapter_model.bin: the engine's load checks the shapes
        linears = targets_of(spec)
        for name, shape in safetensors_shapes(weights, where).items():
            parts = name.split(".")
            kind = next((p for p in parts if p in ("lora_A", "lora_B")), None)
            target = parts[parts.index(kind) - 1] if kind else ""
            if kind is None or target not in linears:
                continue
            fits = [[self.r, i] if kind == "lora_A" else [o, self.r]
                    for i, o in linears[target]]
            if list(shape) not in fits:
                short = name.split("model.", 1)[-1].replace(".weight", "")
                raise UsageError(f"{where} does not fit this base: {short} has shape "
                                 f"{list(shape)}, this model's {target} needs "
                                 f"{' or '.join(map(str, fits))} (made for another base?)")

    def num_params(self, spec: Any) -> int:
        """Trained parameters: r * (in + out) per target linear per layer."""
        linears = LINEARS[spec.family](spec)
        targets = self.targets_for(spec.family)
        per_layer = sum(self.r * (i + o) for t in targets for i, o in linears.get(t, ()))
        head = self.r * (spec.hidden_size + spec.vocab_size) if HEAD in targets else 0
        return per_layer * spec.num_layers + head

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


def targets_of(spec: Any) -> dict[str, tuple[tuple[int, int], ...]]:
    """Target name -> (in, out) of each of its linears: the decoder layers' (LINEARS)
    and the output head (HEAD)."""
    return {**LINEARS[spec.family](spec), HEAD: ((spec.hidden_size, spec.vocab_size),)}


def read_adapter_config(path: str, where: str) -> dict[str, Any]:
    """r, lora_alpha (float) and target_modules (a list) of a PEFT LoRA adapter
    directory's adapter_config.json; UsageError naming `where` when it is not one."""
    from pathlib import Path

    cfg_path = Path(path) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise UsageError(f"{where}: no {ADAPTER_CONFIG} there (not a PEFT adapter "
                         "directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise UsageError(f"{where}: {ADAPTER_CONFIG} is not JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise UsageError(f"{where}: a {cfg.get('peft_type')} adapter, not LoRA")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):   # peft takes a regex or "all-linear" there
        raise UsageError(f"{where}: target_modules {targets!r} is a pattern; graphrl "
                         "needs the list of module names")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(alpha, (int, float)):
        raise UsageError(f"{where}: {ADAPTER_CONFIG} has no integer r or lora_alpha")
    return {**cfg, "r": r, "lora_alpha": float(alpha), "target_modules": list(targets)}


def safetensors_shapes(path: Any, where: str) -> dict[str, list[int]]:
    """Tensor name -> shape, read from a .safetensors file's JSON header (an 8-byte
    little-endian length, then the header: the format's specification,
    huggingface/safetensors README) without loading a tensor."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = f.read(size) if 0 < size < 100_000_000 else b""
    try:
        meta = json.loads(header)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise UsageError(f"{where}: {os.path.basename(path)} is not a safetensors file")
    return {k: list(v["shape"]) for k, v in meta.items() if k != "__metadata__"}


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

    def merged(m: Any) -> Any:   # given without targets: the ones the model declares
        g = given[m.name]
        if m.lora is not None and m.lora.targets and not g.targets:
            g = replace(g, targets=m.lora.targets)
        return replace(m, lora=g)
    out = [merged(m) if m.name in given else m for m in models]
    fresh = [m for m in out if m.lora is not None and not m.lora.adapter]

    def owner(m: Any) -> str:
        if m.trainable or m.head != "lm" or m.shares_base:
            return ""
        return next((f.name for f in fresh if m.init_from == f.name or (
            m.checkpoint is not None and m.checkpoint == f.checkpoint)), "")
    return tuple(replace(m, init_from="", shares_base=owner(m)) if owner(m) else m
                 for m in out)


__all__ = ["LoRA", "LINEARS", "DEFAULT_TARGETS", "HEAD", "targets_of", "parse_lora_option",
           "is_adapter_tensor", "apply_lora", "check_save_target", "read_adapter_config",
           "safetensors_shapes"]
