"""The 1F1B pipeline schedule (PipeDream-Flush: Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", §2.2.1) over
torch.distributed point-to-point messages, for megatron-core stage modules.

Stage s of p with m micro-batches runs min(p - s - 1, m) warm-up forwards, then
alternates one forward and one backward until every forward has run, then the remaining
backwards; at most p - s activations are held at once. Activations travel forward and
their gradients backward as tensors of one fixed shape (every micro-batch has the same
rows and sequence length). Each exchange posts its receive and its send together and
waits on both (so neighbours that both send and receive cannot deadlock), with a timeout.

megatron-core's own schedule (pipeline_parallel/schedules.py) allocates a CUDA tensor
unconditionally, so it does not run on CPU (megatron_cpu.py); this one does the same job
with the same stage modules: a stage takes its input through `set_input_tensor`.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from graphrl.errors import ExecutionError


@dataclass(frozen=True)
class Stage:
    """This rank's place in its pipeline: global ranks of the previous / next stage."""

    index: int
    count: int
    prev: Optional[int]
    next: Optional[int]
    group: Any
    timeout_s: float = 120.0

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def _exchange(stage: Stage, send: Sequence[tuple[torch.Tensor, int]],
              recv: Sequence[tuple[torch.Tensor, int]], what: str) -> None:
    works = [dist.irecv(t, src=r, group=stage.group) for t, r in recv]
    works += [dist.isend(t.contiguous(), dst=r, group=stage.group) for t, r in send]
    for w in works:
        try:
            ok = w.wait(datetime.timedelta(seconds=stage.timeout_s))
        except RuntimeError as e:
            raise ExecutionError(f"pipeline stage {stage.index}: {what} failed: "
                                 f"{str(e).splitlines()[0]}") from None
        if ok is False:
            raise ExecutionError(f"pipeline stage {stage.index}: {what} did not complete "
                                 f"within {stage.timeout_s:g} s")


def forward_only(stage: Stage, run: Callable[[int, Optional[torch.Tensor]], Any],
                 count: int, shape: Sequence[int], dtype: torch.dtype) -> list[Any]:
    """Run micro-batches 0..count-1 through the pipeline without gradients. `run(i, x)`
    computes this stage on micro-batch i with input activation x (None on the first
    stage) and returns the activation to send on (or, on the last stage, the result).
    Returns the last stage's results (empty elsewhere)."""
    out = []
    for i in range(count):
        x = None
        if not stage.first:
            x = torch.empty(tuple(shape), dtype=dtype)
            _exchange(stage, (), [(x, stage.prev)], f"receiving micro-batch {i}")
        with torch.no_grad():
            y = run(i, x)
        if stage.last:
            out.append(y)
        else:
            _exchange(stage, [(y, stage.next)], (), f"sending micro-batch {i}")
    return out


def one_f_one_b(stage: Stage, run: Callable[[int, Optional[torch.Tensor]], Any],
                count: int, shape: Sequence[int], dtype: torch.dtype) -> None:
    """Forward and backward of `count` micro-batches in 1F1B order. `run(i, x)` returns
    the stage output with a graph: an activation to send on, or on the last stage a
    scalar loss (already weighted) to back-propagate. The exchanges pair up as in
    Megatron-LM's schedule: a stage's "send activation, receive gradient" meets the next
    stage's "send gradient, receive activation"."""
    warmup = min(stage.count - stage.index - 1, count)
    steady = count - warmup
    held: list[tuple[Optional[torch.Tensor], torch.Tensor]] = []

    def exchange(act: Optional[torch.Tensor], grad: Optional[torch.Tensor],
                 want_act: bool, want_grad: bool, what: str
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Send `act` on / `grad` back; receive an activation / a gradient."""
        send, recv = [], []
        x = g = None
        if act is not None and not stage.last:
            send.append((act.detach(), stage.next))
        if grad is not None and not stage.first:
            send.append((grad, stage.prev))
        if want_act and not stage.first:
            x = torch.empty(tuple(shape), dtype=dtype)
            recv.append((x, stage.prev))
        if want_grad and not stage.last:
            g = torch.empty(tuple(shape), dtype=dtype)
            recv.append((g, stage.next))
        if send or recv:
            _exchange(stage, send, recv, what)
        if x is not None:
            x.requires_grad_(True)
        return x, g

    def fwd(i: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            y = run(i, x)
        held.append((x, y))
        return y

    def bwd(g: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        x, y = held.pop(0)
        if stage.last:
            torch.autograd.backward(y)
        else:
            torch.autograd.backward(y, grad_tensors=g)
        if stage.first:
            return None
        return x.grad if x.grad is not None else torch.zeros_like(x)

    for i in range(warmup):
        x, _ = exchange(None, None, True, False, f"receiving micro-batch {i}")
        y = fwd(i, x)
        exchange(y, None, False, False, f"sending micro-batch {i}")
    x = None
    if steady:
        x, _ = exchange(None, None, True, False, f"receiving micro-batch {warmup}")
    for k in range(steady):
        i = warmup + k
        y = fwd(i, x)
        _, g = exchange(y, None, False, True, f"sending micro-batch {i} / receiving "
                        f"gradient {k}")
        gx = bwd(g)
        more = k < steady - 1
        x, _ = exchange(None, gx, more, False, f"sending gradient {k}")
    for k in range(steady, count):
        _, g = exchange(None, None, False, True, f"receiving gradient {k}")
        gx = bwd(g)
        exchange(None, gx, False, False, f"sending gradient {k}")


__all__ = ["Stage", "forward_only", "one_f_one_b"]
