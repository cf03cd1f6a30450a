"""Symbolic transfer plans between two layouts of the same weights.

`plan_transfer(src, dst)` says, for every destination piece, which source GPU sends which
slice, so that every destination element is delivered exactly once:

1. Zero redundancy (HybridFlow, Sheng et al. EuroSys'25, §5.3–5.4): whatever a destination
   GPU already holds in the source layout (its own training shard) is a local copy, never
   sent again. With `zero_redundancy_mesh` ordering the generation mesh, each GPU's
   generation shard contains its training shard and it receives only (d_g − 1)/(t·p)·M.
2. The rest is fetched from the GPUs that hold it. Senders are chosen to minimise the most
   any sender sends (greedy, largest chunk first, least-loaded holder; a chunk that would
   overload one holder is split over its holders by water-filling). Same-node holders are
   preferred when `node_of` is given; with `bandwidth(src, dst)` loads are in seconds.
   Loads carry over between the tensors of one `plan_model_reshard`.

Slices are regions of the global tensor (tuples of disjoint boxes, see graphrl.shard); the
wire format of a transfer is its boxes in order, each row-major. `bucketize` splits a plan
into ordered buckets under a per-GPU staging-memory budget. `apply_plan` is the pure numpy
reference executor; numpy is imported only inside the functions that move data.

Pure shard algebra (no torch, no passes): the compiler plans with it
(passes/insert_reshard.py) and the Ray executor re-plans the same transfers at run time
from the engines' real layouts (backends/ray/reshard_steps.py, reshard.py), so it lives in
the core, beside graphrl/shard.py.

"Busiest link" counts each GPU's port, full duplex: max over GPUs of max(sent, received)
— the figure the cost model divides by bandwidth.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from graphrl.parallel import DeviceMesh, Strategy
from graphrl.units import human_bytes
from graphrl.shard import (Box, ModelLayout, Piece, TensorLayout, flat_intervals,
                           piece_local_shape, region_intersect, region_size, region_subtract,
                           split_region)

NodeOf = Callable[[int], int]
Bandwidth = Callable[[int, int], float]


@dataclass(frozen=True)
class Transfer:
    """`src_gpu` sends `boxes` (global coordinates, canonical order) to `dst_gpu`."""

    src_gpu: int
    dst_gpu: int
    boxes: tuple[Box, ...]
    nbytes: int

    def text(self) -> str:
        return (f"g{self.dst_gpu} <- g{self.src_gpu}: {human_bytes(self.nbytes)} "
                + " ".join(b.text() for b in self.boxes))


@dataclass(frozen=True)
class LocalCopy:
    """Data `gpu` already holds in the source layout, copied into its destination pieces."""

    gpu: int
    boxes: tuple[Box, ...]
    nbytes: int


@dataclass(frozen=True)
class GpuTraffic:
    sent: int
    received: int
    local: int


class _Traffic:
    """Per-GPU accounting shared by TransferPlan and ModelTransferPlan."""

    def _transfers(self) -> Iterable[Transfer]:
        raise NotImplementedError

    def _local(self) -> Iterable[LocalCopy]:
        raise NotImplementedError

    def bytes_sent_by(self, gpu: int) -> int:
        return sum(t.nbytes for t in self._transfers() if t.src_gpu == gpu)

    def bytes_received_by(self, gpu: int) -> int:
        return sum(t.nbytes for t in self._transfers() if t.dst_gpu == gpu)

    def local_bytes_on(self, gpu: int) -> int:
        return sum(c.nbytes for c in self._local() if c.gpu == gpu)

    def totals_per_gpu(self) -> dict[int, GpuTraffic]:
        acc: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
        for t in self._transfers():
            acc[t.src_gpu][0] += t.nbytes
            acc[t.dst_gpu][1] += t.nbytes
        for c in self._local():
            acc[c.gpu][2] += c.nbytes
        return {g: GpuTraffic(*acc[g]) for g in sorted(acc)}

    @property
    def total_network_bytes(self) -> int:
        return sum(t.nbytes for t in self._transfers())

    @property
    def max_link_bytes(self) -> int:
        """Bytes through the busiest GPU port: max over GPUs of max(sent, received)."""
        return max((max(v.sent, v.received) for v in self.totals_per_gpu().values()), default=0)

    @property
    def max_sent_bytes(self) -> int:
        return max((v.sent for v in self.totals_per_gpu().values()), default=0)


@dataclass(frozen=True)
class TransferPlan(_Traffic):
    """How one tensor moves from layout `src` to layout `dst`."""

    src: TensorLayout
    dst: TensorLayout
    transfers: tuple[Transfer, ...]
    local_copies: tuple[LocalCopy, ...]
    itemsize: int = 2
    name: str = ""

    def _transfers(self) -> Iterable[Transfer]:
        return self.transfers

    def _local(self) -> Iterable[LocalCopy]:
        return self.local_copies

    def intervals(self, transfer: Transfer) -> tuple[tuple[int, int], ...]:
        """A transfer's slice as merged intervals of the global row-major flattening."""
        return flat_intervals(transfer.boxes, self.src.shape)

    def text(self) -> str:
        head = (f"reshard {self.name or '<tensor>'} {list(self.src.shape)}: network "
                f"{human_bytes(self.total_network_bytes)}, busiest link "
                f"{human_bytes(self.max_link_bytes)}")
        lines = [head] + ["  " + t.text() for t in self.transfers]
        lines += [f"  g{c.gpu} local: {human_bytes(c.nbytes)}" for c in self.local_copies]
        return "\n".join(lines)


@dataclass(frozen=True)
class ModelTransferPlan(_Traffic):
    """One TransferPlan per parameter, planned with shared sender loads."""

    plans: tuple[tuple[str, TransferPlan], ...]

    def __getitem__(self, name: str) -> TransferPlan:
        for n, p in self.plans:
            if n == name:
                return p
        raise KeyError(name)

    def _transfers(self) -> Iterable[Transfer]:
        return (t for _, p in self.plans for t in p.transfers)

    def _local(self) -> Iterable[LocalCopy]:
        return (c for _, p in self.plans for c in p.local_copies)

    def text(self) -> str:
        lines = [f"reshard model: {len(self.plans)} tensors, network "
                 f"{human_bytes(self.total_network_bytes)}, busiest link "
                 f"{human_bytes(self.max_link_bytes)}"]
        for g, v in self.totals_per_gpu().items():
            lines.append(f"  g{g}: sent {human_bytes(v.sent)}, received "
                         f"{human_bytes(v.received)}, local {human_bytes(v.local)}")
        return "\n".join(lines)


# -- planning ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Need:
    dst: int
    boxes: tuple[Box, ...]
    holders: tuple[int, ...]

    @property
    def elements(self) -> int:
        return region_size(self.boxes)


def _needs(src: TensorLayout, dst: TensorLayout
           ) -> tuple[dict[int, list[Box]], list[_Need]]:
    """Split every destination piece into a local part and chunks each held by a set of
    other GPUs (the GPUs holding one distinct source piece)."""
    if src.shape != dst.shape:
        raise ValueError(f"cannot reshard shape {src.shape} into {dst.shape}")
    groups: dict[Piece, tuple[tuple[Box, ...], list[int]]] = {}
    for (gpu, piece), reg in zip(src.pieces, src.regions):
        groups.setdefault(piece, (reg, []))[1].append(gpu)
    local: dict[int, list[Box]] = defaultdict(list)
    needs: list[_Need] = []
    for gpu in dst.gpus:
        held = src.held(gpu)
        for rest in dst.regions_on(gpu):
            if held:
                local[gpu] += region_intersect(rest, held)
                rest = region_subtract(rest, held)
            for preg, holders in groups.values():
                if not rest:
                    break
                others = tuple(h for h in holders if h != gpu)
                part = region_intersect(rest, preg) if others else ()
                if part:
                    needs.append(_Need(gpu, part, others))
                    rest = region_subtract(rest, preg)
            if rest:
                raise ValueError(f"source layout lacks {' '.join(b.text() for b in rest)} "
                                 f"needed by GPU {gpu}")
    return local, needs


class _Balancer:
    """Sender loads for one planning call (bytes, or seconds with `bandwidth`)."""

    def __init__(self, itemsize: int, node_of: Optional[NodeOf], bandwidth: Optional[Bandwidth]):
        if itemsize < 1:
            raise ValueError("itemsize must be >= 1")
        self.itemsize, self.node_of, self.bandwidth = itemsize, node_of, bandwidth
        self.load: dict[int, float] = defaultdict(float)

    def rate(self, src: int, dst: int) -> float:
        return float(self.bandwidth(src, dst)) if self.bandwidth else 1.0

    def candidates(self, need: _Need) -> tuple[int, ...]:
        if self.node_of is not None:
            node = self.node_of(need.dst)
            near = tuple(h for h in need.holders if self.node_of(h) == node)
            if near:
                return tuple(sorted(near))
        return tuple(sorted(need.holders))

    def assign(self, needs: Sequence[_Need]) -> list[tuple[int, int, tuple[Box, ...]]]:
        isz = self.itemsize
        cands = [self.candidates(n) for n in needs]
        total: dict[tuple[int, ...], float] = defaultdict(float)
        for n, hs in zip(needs, cands):
            total[hs] += min(n.elements * isz / self.rate(h, n.dst) for h in hs)
        # A fair share per holder set: whole chunks that stay under it are never split.
        level = {hs: min(self.load[h] for h in hs) + tot / len(hs) for hs, tot in total.items()}
        order = sorted(range(len(needs)), key=lambda i: (-needs[i].elements, needs[i].dst, i))
        out: list[tuple[int, int, tuple[Box, ...]]] = []
        for i in order:
            n, hs = needs[i], cands[i]
            nbytes = n.elements * isz
            best = min(hs, key=lambda h: (self.load[h] + nbytes / self.rate(h, n.dst), h))
            finish = self.load[best] + nbytes / self.rate(best, n.dst)
            cap = max(level[hs], max(self.load.values(), default=0.0))
            if len(hs) == 1 or finish <= cap * (1 + 1e-9):
                self.load[best] = finish
                out.append((best, n.dst, n.boxes))
                continue
            shares = self._waterfill(hs, n.dst, n.elements)
            for (h, e), part in zip(shares, split_region(n.boxes, [e for _, e in shares])):
                self.load[h] += e * isz / self.rate(h, n.dst)
                out.append((h, n.dst, part))
        return out

    def _waterfill(self, hs: Sequence[int], dst: int, elements: int) -> list[tuple[int, int]]:
        """Split `elements` over holders so their loads end level (fewest parts that do)."""
        nbytes = elements * self.itemsize
        srt = sorted(hs, key=lambda h: (self.load[h], h))
        k, lvl = 1, 0.0
        for k in range(1, len(srt) + 1):
            act = srt[:k]
            lvl = (nbytes + sum(self.load[h] * self.rate(h, dst) for h in act)) / \
                sum(self.rate(h, dst) for h in act)
            if k == len(srt) or lvl <= self.load[srt[k]]:
                break
        amounts = {h: max(0.0, (lvl - self.load[h]) * self.rate(h, dst)) / self.itemsize
                   for h in srt[:k]}
        big = max(amounts, key=lambda h: (amounts[h], -h))
        floor = elements / (16 * len(hs))     # slivers go to the biggest share
        parts = {h: int(a) for h, a in amounts.items() if h == big or a >= floor}
        parts[big] += elements - sum(parts.values())
        return [(h, parts[h]) for h in sorted(parts) if parts[h] > 0]


def _plan_one(src: TensorLayout, dst: TensorLayout, bal: _Balancer, name: str) -> TransferPlan:
    local, needs = _needs(src, dst)
    pairs: dict[tuple[int, int], list[Box]] = defaultdict(list)
    for s, d, boxes in bal.assign(needs):
        pairs[(s, d)] += boxes
    isz = bal.itemsize
    transfers = tuple(Transfer(s, d, tuple(bx), region_size(bx) * isz)
                      for (s, d), bx in sorted(pairs.items()))
    copies = tuple(LocalCopy(g, tuple(bx), region_size(bx) * isz)
                   for g, bx in sorted(local.items()) if bx)
    return TransferPlan(src, dst, transfers, copies, isz, name)


def plan_transfer(src: TensorLayout, dst: TensorLayout, bandwidth: Optional[Bandwidth] = None,
                  *, node_of: Optional[NodeOf] = None, itemsize: int = 2,
                  name: str = "") -> TransferPlan:
    """Plan moving one tensor from layout `src` to layout `dst` (see module docstring)."""
    return _plan_one(src, dst, _Balancer(itemsize, node_of, bandwidth), name)


def plan_model_reshard(src: ModelLayout, dst: ModelLayout,
                       bandwidth: Optional[Bandwidth] = None, *,
                       node_of: Optional[NodeOf] = None, itemsize: int = 2) -> ModelTransferPlan:
    """Plan every parameter of `dst` (in its order), balancing senders across all of them."""
    missing = [n for n in dst.names if n not in src]
    if missing:
        raise ValueError(f"source layout lacks parameters: {', '.join(missing[:5])}")
    bal = _Balancer(itemsize, node_of, bandwidth)
    return ModelTransferPlan(tuple((n, _plan_one(src[n], lay, bal, n)) for n, lay in dst.items()))


def verify_transfer_plan(plan: TransferPlan) -> None:
    """Symbolic check: senders hold what they send, and each destination piece receives
    disjoint boxes inside it whose sizes add up to it (so every element exactly once)."""
    got: dict[tuple[int, int], list[Box]] = defaultdict(list)
    moves = [(t.src_gpu, t.dst_gpu, t.boxes, t.nbytes) for t in plan.transfers]
    moves += [(c.gpu, c.gpu, c.boxes, c.nbytes) for c in plan.local_copies]
    for s, d, boxes, nbytes in moves:
        if nbytes != region_size(boxes) * plan.itemsize:
            raise ValueError(f"g{s}->g{d}: nbytes {nbytes} != size of its boxes")
        for b in boxes:
            _locate(plan.src, s, b)
            got[(d, _locate(plan.dst, d, b))].append(b)
    for gpu in plan.dst.gpus:
        for i, reg in enumerate(plan.dst.regions_on(gpu)):
            boxes = got.get((gpu, i), [])
            for j, a in enumerate(boxes):
                for b in boxes[j + 1:]:
                    if a.intersect(b) is not None:
                        raise ValueError(f"g{gpu} piece {i}: {a.text()} delivered twice")
            if region_size(boxes) != region_size(reg):
                raise ValueError(f"g{gpu} piece {i}: {region_size(boxes)} of "
                                 f"{region_size(reg)} elements delivered")


# -- buckets -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketItem:
    param: str
    transfer: Transfer


@dataclass(frozen=True)
class Bucket:
    """Transfers that run together; buckets run in order."""

    items: tuple[BucketItem, ...]

    @property
    def nbytes(self) -> int:
        return sum(i.transfer.nbytes for i in self.items)

    def bytes_on(self, gpu: int) -> int:
        """Staging bytes on `gpu`: what it sends plus what it receives in this bucket."""
        return sum(i.transfer.nbytes for i in self.items
                   if gpu in (i.transfer.src_gpu, i.transfer.dst_gpu))


def bucketize(plan: Union[TransferPlan, ModelTransferPlan], budget_bytes: int, *,
              per_gpu: bool = True) -> tuple[Bucket, ...]:
    """Pack transfers, in plan order, into buckets whose staging bytes stay within
    `budget_bytes` on every GPU (`per_gpu`) or in total; a transfer over the budget is
    cut into consecutive element chunks that each fit."""
    plans = plan.plans if isinstance(plan, ModelTransferPlan) else ((plan.name, plan),)
    buckets: list[Bucket] = []
    cur: list[BucketItem] = []
    use: dict[Any, int] = defaultdict(int)
    for name, p in plans:
        if budget_bytes < p.itemsize:
            raise ValueError(f"budget {budget_bytes} B is below one element ({p.itemsize} B)")
        per = budget_bytes // p.itemsize
        for t in p.transfers:
            chunks = [t]
            if t.nbytes > budget_bytes:
                n = region_size(t.boxes)
                sizes = [per] * (n // per) + ([n % per] if n % per else [])
                chunks = [Transfer(t.src_gpu, t.dst_gpu, bx, region_size(bx) * p.itemsize)
                          for bx in split_region(t.boxes, sizes)]
            for c in chunks:
                keys = (c.src_gpu, c.dst_gpu) if per_gpu else ("all",)
                if cur and any(use[k] + c.nbytes > budget_bytes for k in keys):
                    buckets.append(Bucket(tuple(cur)))
                    cur, use = [], defaultdict(int)
                cur.append(BucketItem(name, c))
                for k in keys:
                    use[k] += c.nbytes
    if cur:
        buckets.append(Bucket(tuple(cur)))
    return tuple(buckets)


# -- numpy reference executor -------------------------------------------------------------
def _locate(layout: TensorLayout, gpu: int, box: Box) -> int:
    """Index (among layout.pieces_on(gpu)) of the piece holding `box`."""
    for i, reg in enumerate(layout.regions_on(gpu)):
        if any(r.contains(box) for r in reg):
            return i
    raise ValueError(f"GPU {gpu} holds no piece containing {box.text()}")


def _local_index(np: Any, piece: Piece, box: Box, shape: Sequence[int]) -> Any:
    """Index into a piece's local array selecting `box` (result shaped like the box)."""
    if isinstance(piece, Box):
        return box.slices(piece.starts)
    w = piece.within or Box.full(shape)
    ext = w.extents
    idx = np.full((1,) * box.ndim, -piece.start, dtype=np.int64)
    for d, ((lo, hi), wlo) in enumerate(zip(box.bounds, w.starts)):
        step = 1
        for e in ext[d + 1:]:
            step *= e
        shp = [1] * box.ndim
        shp[d] = hi - lo
        idx = idx + (np.arange(lo - wlo, hi - wlo, dtype=np.int64) * step).reshape(shp)
    return idx.reshape(box.extents)


def pack(layout: TensorLayout, gpu: int, local: Sequence[Any], boxes: Sequence[Box]) -> Any:
    """The 1-D payload of `boxes` read from `gpu`'s local arrays (layout.pieces_on order)."""
    import numpy as np

    pieces = layout.pieces_on(gpu)
    out = []
    for b in boxes:
        i = _locate(layout, gpu, b)
        out.append(np.asarray(local[i])[_local_index(np, pieces[i], b, layout.shape)].reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def unpack(layout: TensorLayout, gpu: int, local: Sequence[Any], boxes: Sequence[Box],
           payload: Any) -> None:
    """Write a payload made by `pack` into `gpu`'s local arrays, in place."""
    import numpy as np

    pieces = layout.pieces_on(gpu)
    off = 0
    for b in boxes:
        i = _locate(layout, gpu, b)
        local[i][_local_index(np, pieces[i], b, layout.shape)] = \
            payload[off:off + b.size].reshape(b.extents)
        off += b.size
    if off != len(payload):
        raise ValueError(f"payload has {len(payload)} elements, boxes {off}")


def extract(global_array: Any, layout: TensorLayout, gpu: int) -> list[Any]:
    """`gpu`'s local arrays of a tensor: one per piece, box-shaped or 1-D (flat, padded)."""
    import numpy as np

    g = np.asarray(global_array)
    if g.shape != layout.shape:
        raise ValueError(f"array shape {g.shape} != layout shape {layout.shape}")
    out = []
    for p in layout.pieces_on(gpu):
        if isinstance(p, Box):
            out.append(g[p.slices()].copy())
            continue
        flat = g[(p.within or Box.full(layout.shape)).slices()].reshape(-1)
        arr = np.zeros(p.stop - p.start, dtype=g.dtype)
        n = max(0, min(p.stop, flat.size) - p.start)
        arr[:n] = flat[p.start:p.start + n]
        out.append(arr)
    return out


def assemble(layout: TensorLayout, shards: Mapping[int, Sequence[Any]]) -> Any:
    """The global array from every GPU's local arrays (inverse of `extract`)."""
    import numpy as np

    first = next((a for arrs in shards.values() for a in arrs), None)
    out = np.zeros(layout.shape, dtype=np.asarray(first).dtype if first is not None else float)
    seen = np.zeros(layout.shape, dtype=bool)
    for gpu in layout.gpus:
        for i, (p, reg) in enumerate(zip(layout.pieces_on(gpu), layout.regions_on(gpu))):
            for b in reg:
                out[b.slices()] = np.asarray(shards[gpu][i])[_local_index(np, p, b, layout.shape)]
                seen[b.slices()] = True
    if not seen.all():
        raise ValueError(f"layout leaves {int((~seen).sum())} elements unheld")
    return out


def apply_plan(plan: TransferPlan, src_shards: Mapping[int, Sequence[Any]]) -> dict[int, list]:
    """Run a plan on numpy data: each source GPU's local arrays (src.pieces_on order) in,
    each destination GPU's local arrays (dst.pieces_on order; padding zero) out."""
    import numpy as np

    first = next((a for arrs in src_shards.values() for a in arrs), None)
    dtype = np.asarray(first).dtype if first is not None else np.float64
    out = {g: [np.zeros(piece_local_shape(p), dtype=dtype) for p in plan.dst.pieces_on(g)]
           for g in plan.dst.gpus}
    moves = [(c.gpu, c.gpu, c.boxes) for c in plan.local_copies]
    moves += [(t.src_gpu, t.dst_gpu, t.boxes) for t in plan.transfers]
    for s, d, boxes in moves:
        unpack(plan.dst, d, out[d], boxes, pack(plan.src, s, src_shards[s], boxes))
    return out


# -- reference figures ----------------------------------------------------------------------
def naive_allgather_bytes_by_gpu(src: Union[TensorLayout, ModelLayout],
                                 dst: Union[TensorLayout, ModelLayout],
                                 itemsize: int = 2) -> dict[int, int]:
    """DeepSpeed-Chat style: every destination GPU receives the whole tensor minus what it
    already holds in the source layout."""
    pairs = [(src[n], d) for n, d in dst.items()] if isinstance(dst, ModelLayout) else [(src, dst)]
    acc: dict[int, int] = defaultdict(int)
    for s, d in pairs:
        for g in d.gpus:
            acc[g] += (s.numel - s.elements_on(g)) * itemsize
    return dict(sorted(acc.items()))


def naive_allgather_bytes(src: Union[TensorLayout, ModelLayout],
                          dst: Union[TensorLayout, ModelLayout], itemsize: int = 2) -> int:
    return sum(naive_allgather_bytes_by_gpu(src, dst, itemsize).values())


@dataclass(frozen=True)
class HybridFlowTraffic:
    """Per-GPU bytes of a train(t, p, d) → generate(t_g, p_g) switch (HybridFlow §5.4)."""

    deepspeed_chat: float      # all-gather over all t·p·d GPUs: (t·p·d − 1)/(t·p·d)·M
    consecutive: float         # all-gather in the training MP group: (t·p − 1)/(t·p)·M
    zero_redundancy: float     # micro-DP all-gather: (d_g − 1)/(t·p)·M


def hybridflow_traffic(M: float, t: int, p: int, d: int, t_g: int, p_g: int
                       ) -> HybridFlowTraffic:
    if (t * p) % (t_g * p_g):
        raise ValueError(f"t·p = {t * p} is not a multiple of t_g·p_g = {t_g * p_g}")
    d_g = (t * p) // (t_g * p_g)
    n = t * p * d
    return HybridFlowTraffic((n - 1) / n * M, (t * p - 1) / (t * p) * M, (d_g - 1) / (t * p) * M)


def zero_redundancy_mesh(mesh: DeviceMesh, train: Strategy, gen: Strategy) -> DeviceMesh:
    """Order the same GPUs for generation so that each GPU's generation shard contains its
    training shard (HybridFlow §5.4 grouping): with a = t/t_g, b = p/p_g, the training rank
    (dp, pp, tp) becomes generation rank (dp·d_g + tp%a + a·(pp%b), pp//b, tp//a)."""
    t, p, t_g, p_g = train.tp, train.pp, gen.tp, gen.pp
    if t % t_g or p % p_g:
        raise ValueError(f"generation tp={t_g}, pp={p_g} must divide training tp={t}, pp={p}")
    a, b = t // t_g, p // p_g
    if gen.dp != train.dp * a * b or mesh.size != train.world:
        raise ValueError(f"generation dp must be {train.dp * a * b} on the {mesh.size} "
                         f"training GPUs, got {gen.text()}")
    gpus = [0] * mesh.size
    for r, gpu in enumerate(mesh.gpus):
        dp, pp, tp = train.coords(r)
        dp_g = dp * a * b + tp % a + a * (pp % b)
        gpus[(dp_g * p_g + pp // b) * t_g + tp // a] = gpu
    return DeviceMesh(tuple(gpus))


__all__ = ["Transfer", "LocalCopy", "GpuTraffic", "TransferPlan", "ModelTransferPlan",
           "plan_transfer", "plan_model_reshard", "verify_transfer_plan", "BucketItem",
           "Bucket", "bucketize", "pack", "unpack", "extract", "assemble", "apply_plan",
           "naive_allgather_bytes", "naive_allgather_bytes_by_gpu", "HybridFlowTraffic",
           "hybridflow_traffic", "zero_redundancy_mesh"]
