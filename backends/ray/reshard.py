"""Run a symbolic transfer plan (graphrl.reshard_plan) on real tensors with
torch.distributed point-to-point operations.

Every rank taking part calls `execute_plan` with the same plan and its own local tensors:
`src[param]` are its arrays of the source layout (`plan.src.pieces_on(gpu)` order),
`dst[param]` its arrays of the destination layout, written in place. Then:

1. Transfers run bucket by bucket (`bucketize` buckets, default: one bucket holding every
   transfer in plan order). Inside a bucket each (sender, receiver) pair exchanges ONE
   message: the concatenation, in item order, of every transfer's boxes, each box packed
   row-major (the plan's wire format). Receives and sends are all posted (irecv / isend)
   before any is waited on, so the order of posting cannot deadlock; a bucket completes
   before the next starts, so one message per pair needs no tag (NCCL has none).
2. Local copies (what a GPU already holds in the source layout) run last, after every
   send of every bucket has been packed.

Elements travel as `wire_dtype`, whose size must be the plan's `itemsize`, so the bytes a
rank actually sends equal `plan.bytes_sent_by(gpu)`; `ReshardStats` records them.
Destination arrays must not share memory with source arrays.
"""
from __future__ import annotations

import datetime
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist

from graphrl.errors import ExecutionError
from graphrl.reshard_plan import (Bucket, BucketItem, ModelTransferPlan, Transfer,
                                         TransferPlan)
from graphrl.shard import Box, FlatRange, Piece, TensorLayout, region_size

AnyPlan = Union[TransferPlan, ModelTransferPlan]
Locals = Mapping[str, Sequence[torch.Tensor]]


class ReshardError(ExecutionError):
    """A transfer failed or did not complete in time; names the GPUs involved."""


@dataclass(frozen=True)
class ReshardStats:
    """What one GPU did in a reshard: bytes sent / received over the network (per peer
    too), bytes copied locally, messages, wall seconds."""

    gpu: int
    sent_bytes: int
    received_bytes: int
    local_bytes: int
    messages_sent: int
    messages_received: int
    seconds: float
    sent_to: Mapping[int, int] = field(default_factory=dict)
    received_from: Mapping[int, int] = field(default_factory=dict)


# -- local arrays <-> wire payloads --------------------------------------------------------
def _locate(layout: TensorLayout, gpu: int, box: Box) -> int:
    for i, reg in enumerate(layout.regions_on(gpu)):
        if any(r.contains(box) for r in reg):
            return i
    raise ValueError(f"GPU {gpu} holds no piece containing {box.text()}")


def _flat_index(piece: FlatRange, box: Box, shape: Sequence[int], device: Any) -> torch.Tensor:
    """Positions, in a flat piece's 1-D local array, of a box's elements (row-major)."""
    within = piece.within or Box.full(shape)
    idx = torch.full((1,) * box.ndim, -piece.start, dtype=torch.int64, device=device)
    step = 1
    for d in range(box.ndim - 1, -1, -1):
        lo, hi = box.bounds[d]
        base = within.starts[d]
        view = [1] * box.ndim
        view[d] = hi - lo
        idx = idx + (torch.arange(lo - base, hi - base, device=device) * step).view(view)
        step *= within.extents[d]
    return idx.reshape(-1)


def _read(piece: Piece, local: torch.Tensor, box: Box, shape: Sequence[int]) -> torch.Tensor:
    if isinstance(piece, Box):
        return local[box.slices(piece.starts)].reshape(-1)
    return local.reshape(-1)[_flat_index(piece, box, shape, local.device)]


def _write(piece: Piece, local: torch.Tensor, box: Box, shape: Sequence[int],
           values: torch.Tensor) -> None:
    if isinstance(piece, Box):
        local[box.slices(piece.starts)] = values.view(box.extents)
    else:
        flat = local.view(-1)   # a view, so the write lands in `local`
        flat[_flat_index(piece, box, shape, local.device)] = values


@torch.no_grad()
def pack(layout: TensorLayout, gpu: int, local: Sequence[torch.Tensor], boxes: Sequence[Box],
         dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The 1-D wire payload of `boxes` read from `gpu`'s local arrays (a new tensor)."""
    pieces = layout.pieces_on(gpu)
    parts = []
    for b in boxes:
        i = _locate(layout, gpu, b)
        parts.append(_read(pieces[i], local[i], b, layout.shape))
    if not parts:
        return torch.zeros(0, dtype=dtype or torch.float32)
    out = torch.cat(parts)
    return out.to(dtype) if dtype is not None else out


@torch.no_grad()
def unpack(layout: TensorLayout, gpu: int, local: Sequence[torch.Tensor], boxes: Sequence[Box],
           payload: torch.Tensor) -> None:
    """Write a payload made by `pack` into `gpu`'s local arrays, in place."""
    pieces = layout.pieces_on(gpu)
    off = 0
    for b in boxes:
        i = _locate(layout, gpu, b)
        _write(pieces[i], local[i], b, layout.shape,
               payload[off:off + b.size].to(local[i].dtype))
        off += b.size
    if off != payload.numel():
        raise ValueError(f"payload has {payload.numel()} elements, boxes {off}")


# -- execution -------------------------------------------------------------------------------
def plan_items(plan: AnyPlan) -> tuple[tuple[str, TransferPlan], ...]:
    """(param name, TransferPlan) pairs of a model plan, or the one pair of a tensor plan."""
    if isinstance(plan, ModelTransferPlan):
        return plan.plans
    return ((plan.name, plan),)


def participants(plan: AnyPlan) -> tuple[int, ...]:
    """Every GPU that sends, receives or copies in `plan`, sorted."""
    gpus: set[int] = set()
    for _, p in plan_items(plan):
        gpus.update(p.src.gpus)
        gpus.update(p.dst.gpus)
    return tuple(sorted(gpus))


def _check_locals(name: str, layout: TensorLayout, gpu: int, arrays: Sequence[torch.Tensor],
                  role: str) -> None:
    pieces = layout.pieces_on(gpu)
    if len(arrays) != len(pieces):
        raise ValueError(f"{name}: GPU {gpu} gave {len(arrays)} {role} arrays for "
                         f"{len(pieces)} pieces of layout {layout.text()}")
    for p, a in zip(pieces, arrays):
        want = p.extents if isinstance(p, Box) else (p.stop - p.start,)
        if tuple(a.shape) != tuple(want):
            raise ValueError(f"{name}: GPU {gpu} {role} array has shape {tuple(a.shape)}, "
                             f"its piece {p.text()} needs {tuple(want)}")


def _wait(work: Any, what: str, timeout_s: float) -> None:
    try:
        work.wait(datetime.timedelta(seconds=timeout_s))
    except Exception as e:   # gloo/NCCL raise RuntimeError subclasses with a reason
        raise ReshardError(f"{what} failed or did not finish within {timeout_s:g} s: "
                           f"{type(e).__name__}: {e}") from e


def _post(start: Callable[[], Any], what: str) -> Any:
    """Start a point-to-point op; a peer already gone fails here, named like _wait."""
    try:
        return start()
    except Exception as e:
        raise ReshardError(f"{what} failed: {type(e).__name__}: {e}") from e


@torch.no_grad()
def execute_plan(plan: AnyPlan, gpu: int, src: Locals, dst: Locals, *,
                 group: Any = None, rank_of: Optional[Callable[[int], int]] = None,
                 buckets: Optional[Sequence[Bucket]] = None, wire_dtype: torch.dtype,
                 timeout_s: float = 60.0) -> ReshardStats:
    """Run `gpu`'s part of `plan` (see the module docstring). `rank_of(g)` maps a GPU id to
    its rank in the default process group (default: identity); `group` is the process
    group the messages use (default: the world). Raises ReshardError when a peer fails or
    a bucket does not finish within `timeout_s`."""
    t0 = time.perf_counter()
    items = dict(plan_items(plan))
    itemsize = torch.empty(0, dtype=wire_dtype).element_size()
    for name, p in items.items():
        if p.itemsize != itemsize:
            raise ValueError(f"{name}: the plan counts {p.itemsize}-byte elements but the "
                             f"wire dtype {wire_dtype} has {itemsize}")
        if gpu in p.src.gpus:
            _check_locals(name, p.src, gpu, src[name], "source")
        if gpu in p.dst.gpus:
            _check_locals(name, p.dst, gpu, dst[name], "destination")
    if buckets is None:
        buckets = (Bucket(tuple(BucketItem(n, t) for n, p in items.items()
                                for t in p.transfers)),)
    rank = rank_of or (lambda g: g)
    sent_to: dict[int, int] = defaultdict(int)
    recv_from: dict[int, int] = defaultdict(int)
    n_sent = n_recv = 0
    for bi, bucket in enumerate(buckets):
        outgoing: dict[int, list[tuple[str, Transfer]]] = defaultdict(list)
        incoming: dict[int, list[tuple[str, Transfer]]] = defaultdict(list)
        for it in bucket.items:
            t = it.transfer
            if t.src_gpu == t.dst_gpu:
                raise ValueError(f"{it.param}: transfer from GPU {t.src_gpu} to itself")
            if t.src_gpu == gpu:
                outgoing[t.dst_gpu].append((it.param, t))
            if t.dst_gpu == gpu:
                incoming[t.src_gpu].append((it.param, t))
        works: list[tuple[Any, str]] = []
        recv_bufs: list[tuple[int, torch.Tensor]] = []
        for peer in sorted(incoming):
            n = sum(region_size(t.boxes) for _, t in incoming[peer])
            buf = torch.empty(n, dtype=wire_dtype, device=_device_of(dst))
            what = f"bucket {bi}: GPU {gpu} receiving from GPU {peer}"
            works.append((_post(lambda: dist.irecv(buf, src=rank(peer), group=group), what),
                          what))
            recv_bufs.append((peer, buf))
            recv_from[peer] += buf.numel() * itemsize
            n_recv += 1
        send_bufs = []   # kept alive until the sends complete
        for peer in sorted(outgoing):
            payload = torch.cat([pack(items[name].src, gpu, src[name], t.boxes, wire_dtype)
                                 for name, t in outgoing[peer]])
            send_bufs.append(payload)
            what = f"bucket {bi}: GPU {gpu} sending to GPU {peer}"
            works.append((_post(lambda: dist.isend(payload, dst=rank(peer), group=group),
                                what), what))
            sent_to[peer] += payload.numel() * payload.element_size()
            n_sent += 1
        deadline = time.monotonic() + timeout_s
        for work, what in works:
            _wait(work, what, max(deadline - time.monotonic(), 0.001))
        for peer, buf in recv_bufs:
            off = 0
            for name, t in incoming[peer]:
                n = region_size(t.boxes)
                unpack(items[name].dst, gpu, dst[name], t.boxes, buf[off:off + n])
                off += n
        del send_bufs
    local = 0
    for name, p in items.items():
        for c in p.local_copies:
            if c.gpu == gpu:
                unpack(p.dst, gpu, dst[name], c.boxes, pack(p.src, gpu, src[name], c.boxes))
                local += region_size(c.boxes) * itemsize
    return ReshardStats(gpu, sum(sent_to.values()), sum(recv_from.values()), local, n_sent,
                        n_recv, time.perf_counter() - t0, dict(sent_to), dict(recv_from))


def _device_of(arrays: Locals) -> torch.device:
    for arrs in arrays.values():
        for a in arrs:
            return a.device
    return torch.device("cpu")


__all__ = ["ReshardError", "ReshardStats", "pack", "unpack", "plan_items", "participants",
           "execute_plan"]
