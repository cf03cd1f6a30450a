"""LoRA on Hugging Face modules through peft (graphrl.lora: the spec and its pricing).

`wrap` turns an HF module into a peft LoraModel as the model spec's LoRA says: every
target linear computes W x + (alpha / r) B A x (Hu et al. 2021, eq. (3)); W and every
other weight of the base are frozen (no gradients, no optimizer state) and held in the
planned precision only (bf16 weights under bf16 mixed precision, no fp32 copy), while A
and B are fp32 master weights trained by AdamW under bf16 autocast. `adapter` in the
spec loads an existing PEFT adapter directory (to continue training), after checking it
was made for this base.

`SharedBase` is a model that *is* another model's frozen base (ModelDecl.shares_base: a
reference that starts as a LoRA policy): it runs the owner's module with the adapters
switched off (peft's `disable_adapter`) and holds no weights of its own.

`save_adapter` writes the trained adapters as a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) that `peft.PeftModel.from_pretrained`
loads onto the base.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from graphrl.errors import UsageError

from graphrl.lora import ADAPTER_CONFIG  # noqa: E402,F401  (the name, kept here too)
BASE_DIR = "base"   # --save of a LoRA model whose base was built in code: the base, beside


def check_adapter_dir(path: str, decl: Any, base_source: str | None) -> dict[str, Any]:
    """The adapter_config.json of a PEFT adapter directory, after checking it is LoRA
    with this spec's r, alpha and targets and tensors of this model's shapes
    (graphrl.lora.LoRA.check_adapter), and (when both name one) the same base."""
    from graphrl.lora import read_adapter_config

    where = f"model {decl.name}: LoRA adapter {path}"
    decl.spec.lora.check_adapter(decl.spec, f"model {decl.name}")
    cfg = read_adapter_config(path, where)
    named = cfg.get("base_model_name_or_path") or ""
    if named and base_source and Path(named).name != Path(base_source).name:
        raise UsageError(f"{where}: made for base {named!r}, this model loads "
                         f"{base_source!r}")
    return cfg


def lora_config(decl: Any) -> Any:
    """peft's LoraConfig of the model spec's LoRA."""
    from peft import LoraConfig

    lora = decl.spec.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                      target_modules=list(lora.targets_for(decl.spec.family)),
                      lora_dropout=lora.dropout, bias="none",
                      fan_in_fan_out=decl.spec.family == "gpt2")   # GPT-2's Conv1D


def wrap(module: nn.Module, decl: Any, precision: str, base_source: str | None) -> nn.Module:
    """`module` with LoRA adapters (peft), base frozen in the planned precision, the
    adapters fp32 and trainable."""
    from peft import PeftModel, get_peft_model

    lora = decl.spec.lora
    if precision == "bf16":   # the frozen base: bf16 weights only
        module.to(torch.bfloat16)
    if lora.adapter:
        check_adapter_dir(lora.adapter, decl, base_source)
        try:
            model = PeftModel.from_pretrained(module, lora.adapter, is_trainable=True)
        except (RuntimeError, ValueError) as e:   # shapes of another base
            first = str(e).strip().splitlines()
            raise UsageError(f"model {decl.name}: LoRA adapter {lora.adapter} does not fit "
                             f"this base: {first[-1] if first else e}") from None
    else:
        model = get_peft_model(module, lora_config(decl))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()   # fp32 master weights of the adapters
    return model.eval()   # new adapter modules too: their dropout only while training


class TrainableView:
    """A module seen through its trainable parameters only (what the optimizer holds)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.module.named_parameters() if p.requires_grad)

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_parameters())


@contextlib.contextmanager
def adapter_dropout(module: nn.Module) -> Iterator[None]:
    """The adapters' dropout on while training (the engine keeps modules in eval mode)."""
    drops = [m for n, m in module.named_modules()
             if "lora_dropout" in n and isinstance(m, nn.Dropout) and m.p > 0]
    for m in drops:
        m.train()
    try:
        yield
    finally:
        for m in drops:
            m.eval()


def base_model(module: nn.Module) -> nn.Module:
    """The HF module under peft's wrappers (itself when there are none)."""
    get = getattr(module, "get_base_model", None)
    return get() if get is not None else module


class SharedBase:
    """The engine of a model that is `owner`'s frozen base: forward and generate run the
    owner's module with its adapters off; nothing of its own to hold, move or save."""

    def __init__(self, decl: Any, owner: Any):
        self.decl, self.owner = decl, owner
        self.version = 0
        self.device = owner.device

    @property
    def module(self) -> nn.Module:
        return self.owner.module

    @property
    def tokens(self) -> Any:
        return self.owner.tokens

    def ran_precision(self) -> str:
        return self.owner.ran_precision()

    def forward(self, rollout: Mapping[str, Any]) -> dict[str, Any]:
        with self.owner.module.disable_adapter():
            return self.owner.forward(rollout)

    def generate(self, prompts: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
        with self.owner.module.disable_adapter():
            return self.owner.generate(prompts, **kw)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The base's weights under the HF module's own names (an owner that shards its
        weights, the DeepSpeed engine, gathers them itself: its `base_weights`)."""
        own = getattr(self.owner, "base_weights", None)
        return own() if own is not None else merged_weights(self.owner.module, adapters=False)

    def state_dict(self) -> dict[str, Any]:
        return {"shares_base": self.owner.decl.name, "version": self.version}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("shares_base") != self.owner.decl.name:
            raise UsageError(f"model {self.decl.name}: the checkpoint holds "
                             f"{sorted(state)[:3]}, not the shared base of "
                             f"{self.owner.decl.name}")

    def offload(self) -> None:
        """Nothing of its own: the owner's engine moves the weights."""

    def onload(self) -> None:
        """Nothing of its own: the owner's engine moves the weights."""


@contextlib.contextmanager
def merged(module: nn.Module) -> Iterator[None]:
    """Inside: each target linear's weight reads W + (alpha / r) B A (computed in the
    base's dtype); after: the very tensors W again (swapped back, not subtracted: the
    frozen base stays bit-exact). What the fast engine's decode copy is refreshed from."""
    from peft.tuners.lora import LoraLayer

    swapped = []
    try:
        with torch.no_grad():
            for layer in (m for m in base_model(module).modules() if isinstance(m, LoraLayer)):
                if layer.disable_adapters:   # inside disable_adapter(): the base itself
                    continue
                w = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
                swapped.append((w, w.data))
                w.data = w.data + delta.to(w.dtype)
        yield
    finally:
        for w, data in swapped:
            w.data = data


def decode_source(module: nn.Module) -> tuple[nn.Module, Any]:
    """What a decode copy (fast_model.FastLM) is built from: the HF module, and under
    LoRA the context in which its weights are merged (None without adapters)."""
    if not hasattr(module, "get_base_model"):
        return module, None
    from functools import partial

    return base_model(module), partial(merged, module)


def merged_weights(module: nn.Module, adapters: bool = True) -> dict[str, torch.Tensor]:
    """The plain HF state dict of a peft model: each target's W + (alpha / r) B A
    (`adapters`), or the base's W alone; computed on copies, the module unchanged."""
    from peft.tuners.lora import LoraLayer

    base = base_model(module)
    layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        value = tensor.detach().clone()
        owner, _, leaf = name.rpartition(".base_layer.")
        if adapters and owner in layers and leaf == "weight":
            layer = layers[owner]
            for a in layer.active_adapters:
                value = value + layer.get_delta_weight(a).to(value.dtype)
        out[name.replace(".base_layer.", ".")] = value.cpu()
    return out


def save_adapter(target: str, engine: Any, base_source: str | None,
                 models: Mapping[str, Any], export: Any) -> list[str]:
    """Write `engine`'s adapters as a PEFT adapter directory at `target` (atomically:
    written beside it, renamed into place). The base it names: the model directory it
    was loaded from, else (built in code) the base saved into target/base, so
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<base>), target)`
    gives the trained model. Any other trained model of the run (`models`, graphrl.Model
    by name: a critic) goes to target/<name> as a Hugging Face directory, its weights
    from `export(name)`. Refuses a target that holds a full model."""
    import shutil
    import tempfile

    from graphrl.lora import check_save_target

    from .hf_checkpoint import empty_module, publish_dir, save_models

    check_save_target(target, models.values())
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    written = [target]
    try:
        module = engine.module
        base_path = str(Path(base_source).resolve()) if base_source else None
        if base_source is None:   # a base built in code: saved beside the adapter
            base = base_model(module)
            state = merged_weights(module, adapters=False)
            copy = type(base)(base.config)
            copy.load_state_dict(state)
            copy.save_pretrained(tmp / BASE_DIR, safe_serialization=True)
            base_path = str(out.resolve() / BASE_DIR)
            written.append(str(out / BASE_DIR))
        module.peft_config["default"].base_model_name_or_path = base_path
        module.save_pretrained(str(tmp), safe_serialization=True)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for m in models.values():
        if m.trainable and m.name != engine.decl.name:
            save_models(str(out / m.name), [("", empty_module(m.decl(), m.checkpoint),
                                             export(m.name))])
            written.append(str(out / m.name))
    return written


def save_merged(target: str, models: Mapping[str, Any], engines: Mapping[str, Any]) -> str:
    """Write the LoRA policy with its adapters merged (W + (alpha / r) B A) as a plain
    Hugging Face directory at `target` (atomically; the tokenizer of the model directory
    it was loaded from copied beside it)."""
    from dataclasses import replace

    from graphrl.hf_dir import TOKENIZER_FILES

    from .hf_checkpoint import empty_module, save_models

    policy = next(m for m in models.values() if m.lora is not None and m.trainable)
    decl = policy.decl()
    plain = replace(decl, spec=replace(decl.spec, lora=None))
    source = policy.checkpoint
    if source is not None and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        source = None
    save_models(target, [("", empty_module(plain, policy.checkpoint),
                          merged_weights(engines[policy.name].module))], source)
    return target


__all__ = ["decode_source", "save_merged", "wrap", "lora_config", "TrainableView", "adapter_dropout", "base_model", "SharedBase", "merged",
           "merged_weights", "save_adapter", "check_adapter_dir"]
