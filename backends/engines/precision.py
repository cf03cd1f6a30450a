"""The precision an engine computes in: the plan's, never another (docs/engines.md,
"Precision").

A model's precision is its spec's `dtype` (graphrl.types.PRECISIONS):
- "bf16": bf16 mixed precision (Micikevicius et al. 2018, "Mixed Precision Training",
  with bf16 in place of fp16, so no loss scaling): a trainable model keeps fp32 master
  weights and fp32 Adam state and computes its forward and backward under
  `torch.autocast(dtype=torch.bfloat16)`; log-softmax, losses, the value/score head's
  output and the gradient norm stay fp32. A frozen model (and a generation copy) holds
  bf16 weights only and computes in bf16, with no fp32 copy and no per-call cast.
  `generate` of a bf16 model computes as its generation copy does, on bf16-held
  weights (`held_as`: a trainable model's weights rounded to bf16 for the call), so
  the tokens sampled do not depend on whether generation runs on the trainer or on a
  copy of its own (the Ray backend's, after a reshard).
- "fp32": fp32 weights, compute and optimizer state.

`check_precision` refuses bf16 on a device that cannot compute it (before any engine is
built), naming the model, the device and the `--precision fp32` way out.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

from graphrl.errors import UsageError
from graphrl.types import PRECISIONS

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes in bf16: CUDA devices that support it
    (torch.cuda.is_bf16_supported), CPUs whose oneDNN has bf16 kernels (AVX-512 BF16 /
    AMX; torch.ops.mkldnn._is_mkldnn_bf16_supported)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return (torch.backends.mkldnn.is_available()
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    return False


def check_precision(decl: Any, device: torch.device | str) -> str:
    """The precision `decl` is planned in, after checking `device` can compute it
    (UsageError otherwise: no silent fallback to fp32)."""
    device = torch.device(device)
    precision = decl.spec.dtype
    if precision not in PRECISIONS:
        raise UsageError(f"model {decl.name}: unknown precision {precision!r} (allowed: "
                         f"{', '.join(PRECISIONS)})")
    if precision == "bf16" and not bf16_supported(device):
        raise UsageError(
            f"model {decl.name}: planned in bf16 mixed precision, but device {device} "
            "cannot compute in bf16 (" + ("torch.cuda.is_bf16_supported() is False"
                                          if device.type == "cuda" else
                                          "this CPU has no bf16 kernels in oneDNN")
            + f"); run it in fp32: --precision fp32 (or --precision {decl.name}=fp32, "
            f"or gr.Model(..., precision=\"fp32\"))")
    return precision


def check_precisions(decls: Iterable[Any], device: str) -> None:
    """check_precision for every model of a run, before anything is built."""
    for decl in decls:
        check_precision(decl, device)


def autocast(device: torch.device, precision: str, module: torch.nn.Module) -> Any:
    """The context a forward/backward of `module` runs in: bf16 autocast over fp32
    (master) weights in bf16 precision; nothing for bf16-held weights (they compute in
    bf16 as they are) or fp32."""
    if precision == "bf16" and held_dtype(module) == torch.float32:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def held_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's floating-point weights (one for all of them)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise UsageError(f"{type(module).__name__} holds weights in several dtypes "
                         f"{sorted(map(str, dtypes))}")
    return dtypes.pop()


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # a torch without distributed
        return False
    return isinstance(t, DTensor)


def sharded(module: torch.nn.Module) -> bool:
    """Whether `module` holds sharded (FSDP2 DTensor) parameters."""
    return any(_is_dtensor(p) for p in module.parameters())


@contextlib.contextmanager
def held_as(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run `module` on its floating-point parameters and buffers cast to `dtype`, as a
    copy made by `module.to(dtype)` would hold them (a generation copy, graphrl's Ray
    backend), then put the originals back, bit for bit: the Parameter objects, their
    gradients and the optimizer's state are untouched. The cast tensors are a transient
    copy (what a generation copy holds). Refused on DTensor parameters (FSDP2 casts its
    own, MixedPrecisionPolicy)."""
    params: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    buffers: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    seen: set[int] = set()
    try:
        with torch.no_grad():
            for m in module.modules():
                for p in m._parameters.values():
                    if p is None or id(p) in seen or not p.is_floating_point() \
                            or p.dtype == dtype:
                        continue
                    if _is_dtensor(p):
                        raise UsageError(f"{type(module).__name__}: held_as on a sharded "
                                         "(DTensor) parameter")
                    seen.add(id(p))
                    params.append((p, p.data))
                    p.data = p.data.to(dtype)
                for name, b in m._buffers.items():
                    if b is not None and b.is_floating_point() and b.dtype != dtype:
                        buffers.append((m, name, b))
                        m._buffers[name] = b.to(dtype)
        yield
    finally:
        for p, data in params:
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b


def ran_precision(module: torch.nn.Module, autocast_on: bool) -> str:
    """The precision a module computes in, from what it holds: bf16 weights, or fp32
    weights under bf16 autocast, are bf16; fp32 weights without it fp32."""
    held = held_dtype(module)
    if held == torch.bfloat16 or (held == torch.float32 and autocast_on):
        return "bf16"
    if held == torch.float32:
        return "fp32"
    return str(held).replace("torch.", "")


__all__ = ["TORCH_DTYPES", "bf16_supported", "check_precision", "check_precisions",
           "autocast", "held_as", "held_dtype", "ran_precision", "sharded"]
