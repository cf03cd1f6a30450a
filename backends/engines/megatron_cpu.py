"""The one place where megatron-core is made to run on CPU (gloo) — read this first.

megatron-core 0.16 is written for CUDA. Its model code (GPTModel, the tensor-parallel
linear layers, the sequence-parallel gathers) runs on CPU once `torch.cuda.current_device()`
answers, because it allocates its communication buffers and RoPE frequencies with
`device=torch.cuda.current_device()` (tensor_parallel/mappings.py, layers.py,
utils.GlobalMemoryBuffer, models/common/embeddings/rotary_pos_embedding.py). On a
CPU-only torch that call raises "Torch not compiled with CUDA enabled".

`allow_cpu()`, in this process only and only when it has no CUDA (a CUDA process is
never touched), makes three changes:
- `torch.cuda.current_device()` returns the CPU device;
- the tensor-parallel RNG tracker's `fork()` (entered around attention dropout,
  tensor_parallel/random.py) becomes an empty context: it would swap CUDA RNG states.
  graphrl's engines run without dropout and load their weights from the HF model, so
  megatron's RNG streams never matter;
- the tensor-parallel linear layers' autograd function
  (LinearWithGradAccumulationAndAsyncCommunication) casts its input, weight and bias
  to the CPU autocast dtype and runs with autocast off, as torch.amp.custom_fwd(
  cast_inputs=...) does (megatron-core decorates it for CUDA only). Under bf16 autocast
  (a bf16 model, megatron.py) its forward would otherwise compute in bf16 from fp32
  saved tensors, and its backward fail (bf16 gradients times fp32 weights, a bf16
  reduce-scatter into an fp32 buffer with sequence parallelism).
Nothing else is patched:
- megatron's pipeline schedules allocate `torch.zeros(..., device="cuda")` unconditionally,
  so graphrl runs its own 1F1B schedule (megatron_pipeline.py) over megatron-core's
  stage modules instead of patching them;
- ZeRO-1 uses torch's ZeroRedundancyOptimizer (megatron's DistributedOptimizer needs its
  CUDA-stream DDP buffers).
"""
from __future__ import annotations

import torch


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def allow_cpu() -> None:
    """Let megatron-core allocate on the CPU in a process without CUDA (idempotent)."""
    if torch.cuda.is_available():
        return
    import contextlib

    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.current_device = _cpu_device
    tracker = tp_random.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    from megatron.core.tensor_parallel.layers import \
        LinearWithGradAccumulationAndAsyncCommunication as linear_fn
    _cpu_autocast_inputs(linear_fn)


def _cpu_autocast_inputs(fn: type) -> None:
    """Make autograd Function `fn(ctx, input, weight, bias, ...)` cast its floating
    inputs to the CPU autocast dtype when autocast is on, and run without it (its
    backward then sees one dtype; autograd casts the gradients back to the inputs')."""
    if getattr(fn, "_graphrl_cpu_autocast", False):
        return
    forward = fn.forward

    def fwd(ctx, input, weight, bias, *rest):   # type: ignore[no-untyped-def]
        if not torch.is_autocast_enabled("cpu"):
            return forward(ctx, input, weight, bias, *rest)
        dtype = torch.get_autocast_dtype("cpu")

        def cast(t):   # type: ignore[no-untyped-def]
            return t.to(dtype) if t is not None and t.is_floating_point() else t
        with torch.autocast("cpu", enabled=False):
            return forward(ctx, cast(input), cast(weight), cast(bias), *rest)

    fn.forward = staticmethod(fwd)
    fn._graphrl_cpu_autocast = True


__all__ = ["allow_cpu"]
