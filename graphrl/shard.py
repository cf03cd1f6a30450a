"""Shard algebra: which slice of a global tensor each GPU holds.

A tensor's layout is its global shape plus a list of (gpu, piece). A piece is either
- a `Box`: a hyper-rectangle `[start, stop)` per dim (tensor-parallel chunks as Megatron-LM
  and DTensor `Shard(d)` make them, FSDP2 even dim-0 chunks, replicas), or
- a `FlatRange`: a contiguous range of the row-major flattening of a box (by default the
  whole tensor), padded at the end: DeepSpeed ZeRO-3's `ds_tensor` partitions
  (Rajbhandari et al. 2020), also ZeRO-3 applied to a tensor-parallel local shard.

Both reduce to one currency, a *region*: a tuple of disjoint boxes in global coordinates.
A flat range of a box is the union of at most 2·ndim − 1 boxes (`flat_to_boxes`), so the
intersection of any two pieces is a handful of box intersections — a dim-1 tensor-parallel
chunk of a (8192 × 28672) matrix stays one box instead of 8192 flat intervals. Flat
intervals are still available as a view (`flat_intervals`), merged into maximal runs.

Canonical element order of a region (the wire format of a transfer): its boxes in tuple
order, each in row-major order.

Layout constructors follow the conventions seen to work on CPU with gloo (DESIGN.md,
"Sharded training on CPU with gloo"): colwise = Shard(0) over tp (q, k, v, gate, up;
vocab-parallel embedding / lm_head), rowwise = Shard(1) (o, down), replicate (norms);
chunks use torch.chunk semantics (ceil-sized, last one short, possibly none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from itertools import product
from typing import Any, Iterator, Optional, Sequence, Union

from graphrl.parallel import DeviceMesh, Strategy

Interval = tuple[int, int]
TP_KINDS = ("colwise", "rowwise", "replicate", "fused3")
ZERO_FORMATS = ("flat", "dim0")   # DeepSpeed ZeRO-3 flat slices | FSDP2 Shard(0) chunks


@dataclass(frozen=True)
class Box:
    """A hyper-rectangle `[lo, hi)` per dim of a global tensor (a 0-dim box is a scalar)."""

    bounds: tuple[Interval, ...]

    def __post_init__(self) -> None:
        b = tuple((int(lo), int(hi)) for lo, hi in self.bounds)
        for lo, hi in b:
            if lo < 0 or hi < lo:
                raise ValueError(f"bad box bounds {self.bounds}")
        object.__setattr__(self, "bounds", b)

    @classmethod
    def full(cls, shape: Sequence[int]) -> "Box":
        return cls(tuple((0, int(n)) for n in shape))

    @property
    def ndim(self) -> int:
        return len(self.bounds)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(lo for lo, _ in self.bounds)

    @property
    def extents(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in self.bounds)

    @property
    def size(self) -> int:
        return math.prod(self.extents)

    def intersect(self, other: "Box") -> Optional["Box"]:
        """The common box, or None when empty."""
        out = []
        for (a, b), (c, d) in zip(self.bounds, other.bounds):
            lo, hi = max(a, c), min(b, d)
            if hi <= lo:
                return None
            out.append((lo, hi))
        return Box(tuple(out))

    def contains(self, other: "Box") -> bool:
        return all(a <= c and d <= b for (a, b), (c, d) in zip(self.bounds, other.bounds))

    def subtract(self, other: "Box") -> tuple["Box", ...]:
        """self minus other as at most 2·ndim disjoint boxes (peeling one dim at a time)."""
        if self.intersect(other) is None:
            return (self,) if self.size else ()
        out: list[Box] = []
        cur = list(self.bounds)
        for d, ((a, b), (c, e)) in enumerate(zip(self.bounds, other.bounds)):
            if a < c:
                out.append(Box(tuple(cur[:d]) + ((a, c),) + tuple(cur[d + 1:])))
            if e < b:
                out.append(Box(tuple(cur[:d]) + ((e, b),) + tuple(cur[d + 1:])))
            cur[d] = (max(a, c), min(b, e))
        return tuple(out)

    def shift(self, offsets: Sequence[int]) -> "Box":
        return Box(tuple((lo + o, hi + o) for (lo, hi), o in zip(self.bounds, offsets)))

    def slices(self, origin: Optional[Sequence[int]] = None) -> tuple[slice, ...]:
        """Index this box in an array whose element 0 sits at `origin` (default 0)."""
        o = origin or (0,) * self.ndim
        return tuple(slice(lo - x, hi - x) for (lo, hi), x in zip(self.bounds, o))

    def text(self) -> str:
        return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in self.bounds) + "]"


@dataclass(frozen=True)
class FlatRange:
    """Elements `[start, stop)` of the row-major flattening of `within` (default: the whole
    tensor). `stop` may pass the end: the excess is padding (DeepSpeed pads the flattened
    tensor to a multiple of dp), held locally as zeros and owned by nobody."""

    start: int
    stop: int
    within: Optional[Box] = None

    def __post_init__(self) -> None:
        if self.start < 0 or self.stop < self.start:
            raise ValueError(f"bad flat range [{self.start}, {self.stop})")

    def text(self) -> str:
        w = "" if self.within is None else f" of {self.within.text()}"
        return f"flat[{self.start}:{self.stop}]{w}"


Piece = Union[Box, FlatRange]


# -- regions: tuples of disjoint boxes ------------------------------------------------------
def region_size(boxes: Sequence[Box]) -> int:
    return sum(b.size for b in boxes)


def region_intersect(a: Sequence[Box], b: Sequence[Box]) -> tuple[Box, ...]:
    out = []
    for x in a:
        for y in b:
            z = x.intersect(y)
            if z is not None:
                out.append(z)
    return tuple(out)


def region_subtract(a: Sequence[Box], b: Sequence[Box]) -> tuple[Box, ...]:
    cur = list(a)
    for y in b:
        cur = [z for x in cur for z in x.subtract(y)]
    return tuple(cur)


def flat_to_boxes(extents: Sequence[int], start: int, stop: int) -> tuple[Box, ...]:
    """Elements [start, stop) of the row-major order of an array of `extents`, as at most
    2·ndim − 1 disjoint boxes (local coordinates), each contiguous and in order."""
    extents = tuple(extents)
    if stop <= start:
        return ()
    if not extents:
        return (Box(()),)
    inner = math.prod(extents[1:])
    rest_full = tuple((0, n) for n in extents[1:])
    r0, o0 = divmod(start, inner)
    r1, o1 = divmod(stop, inner)
    if r0 == r1:
        return tuple(Box(((r0, r0 + 1),) + b.bounds) for b in flat_to_boxes(extents[1:], o0, o1))
    out: list[Box] = []
    if o0:
        out += [Box(((r0, r0 + 1),) + b.bounds) for b in flat_to_boxes(extents[1:], o0, inner)]
        r0 += 1
    if r1 > r0:
        out.append(Box(((r0, r1),) + rest_full))
    if o1:
        out += [Box(((r1, r1 + 1),) + b.bounds) for b in flat_to_boxes(extents[1:], 0, o1)]
    return tuple(out)


def flat_intervals(boxes: Sequence[Box], shape: Sequence[int]) -> tuple[Interval, ...]:
    """The region as sorted, merged intervals of the global row-major flattening."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    runs: list[Interval] = []
    for box in boxes:
        if not box.size:
            continue
        j = box.ndim - 1   # innermost dim not covered in full by the box decides the run
        while j > 0 and box.bounds[j] == (0, shape[j]):
            j -= 1
        if box.ndim == 0:
            runs.append((0, 1))
            continue
        length = box.extents[j] * strides[j]
        base = box.bounds[j][0] * strides[j]
        for idx in product(*(range(lo, hi) for lo, hi in box.bounds[:j])):
            s = base + sum(i * st for i, st in zip(idx, strides))
            runs.append((s, s + length))
    runs.sort()
    merged: list[Interval] = []
    for s, e in runs:
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return tuple(merged)


def split_region(boxes: Sequence[Box], sizes: Sequence[int]) -> tuple[tuple[Box, ...], ...]:
    """Cut a region, in canonical element order, into consecutive parts of `sizes` elements
    (which must sum to the region's size). Each box is cut by `flat_to_boxes`."""
    if sum(sizes) != region_size(boxes):
        raise ValueError(f"split sizes {sum(sizes)} != region size {region_size(boxes)}")
    parts: list[tuple[Box, ...]] = []
    queue = [(b, 0) for b in boxes if b.size]   # (box, elements of it already taken)
    qi = 0
    for want in sizes:
        part: list[Box] = []
        while want > 0:
            box, taken = queue[qi]
            n = min(want, box.size - taken)
            part += [b.shift(box.starts) for b in flat_to_boxes(box.extents, taken, taken + n)]
            want -= n
            if taken + n == box.size:
                qi += 1
            else:
                queue[qi] = (box, taken + n)
        parts.append(tuple(part))
    return tuple(parts)


def piece_region(piece: Piece, shape: Sequence[int]) -> tuple[Box, ...]:
    """The global elements a piece holds (padding excluded), as disjoint boxes."""
    if isinstance(piece, Box):
        return (piece,) if piece.size else ()
    w = piece.within or Box.full(shape)
    stop = min(piece.stop, w.size)
    return tuple(b.shift(w.starts) for b in flat_to_boxes(w.extents, piece.start, stop))


def piece_local_shape(piece: Piece) -> tuple[int, ...]:
    """Shape of the local array holding a piece: the box's extents, or 1-D for flat."""
    if isinstance(piece, Box):
        return piece.extents
    return (piece.stop - piece.start,)


# -- layouts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorLayout:
    """What each GPU holds of one tensor of `shape`. A GPU may hold nothing, one piece, or
    several disjoint pieces; replication = several GPUs holding equal pieces."""

    shape: tuple[int, ...]
    pieces: tuple[tuple[int, Piece], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        full = Box.full(self.shape)
        for gpu, piece in self.pieces:
            box = piece if isinstance(piece, Box) else (piece.within or full)
            if box.ndim != len(self.shape) or not full.contains(box):
                raise ValueError(f"piece {piece.text()} on GPU {gpu} is outside shape {self.shape}")
        for gpu in self.gpus:
            regs = [r for g, _, r in self._triples() if g == gpu]
            for i, a in enumerate(regs):
                for b in regs[i + 1:]:
                    if region_intersect(a, b):
                        raise ValueError(f"GPU {gpu} holds overlapping pieces of {self.shape}")

    def _triples(self) -> Iterator[tuple[int, Piece, tuple[Box, ...]]]:
        for (gpu, piece), reg in zip(self.pieces, self.regions):
            yield gpu, piece, reg

    @cached_property
    def regions(self) -> tuple[tuple[Box, ...], ...]:
        """piece_region of each piece, aligned with `pieces`."""
        return tuple(piece_region(p, self.shape) for _, p in self.pieces)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def gpus(self) -> tuple[int, ...]:
        return tuple(sorted({g for g, _ in self.pieces}))

    def pieces_on(self, gpu: int) -> tuple[Piece, ...]:
        return tuple(p for g, p in self.pieces if g == gpu)

    def regions_on(self, gpu: int) -> tuple[tuple[Box, ...], ...]:
        return tuple(r for g, _, r in self._triples() if g == gpu)

    def held(self, gpu: int) -> tuple[Box, ...]:
        """Every global element on `gpu`, as one region."""
        return tuple(b for r in self.regions_on(gpu) for b in r)

    def elements_on(self, gpu: int) -> int:
        return region_size(self.held(gpu))

    def is_complete(self) -> bool:
        """True when every element of the tensor is held somewhere."""
        return not region_subtract((Box.full(self.shape),), [b for r in self.regions for b in r])

    def text(self) -> str:
        body = ", ".join(f"g{g}:{p.text()}" for g, p in self.pieces)
        return f"{list(self.shape)} {{{body}}}"


def chunk_bounds(n: int, parts: int, i: int) -> Optional[Interval]:
    """torch.chunk semantics: ceil(n/parts)-sized chunks, the last short; None if empty."""
    c = -(-n // parts)
    lo, hi = min(i * c, n), min((i + 1) * c, n)
    return (lo, hi) if hi > lo else None


def stage_of(layer_index: Optional[int], num_layers: int, pp: int) -> Optional[int]:
    """Pipeline stage of a layer under an even contiguous split (Megatron-LM / GPipe).
    layer_index −1 (embeddings) maps to the first stage, num_layers (final norm, lm_head)
    to the last; None means every stage holds the parameter."""
    if layer_index is None:
        return None
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    idx = min(max(layer_index, 0), num_layers - 1)
    return idx * pp // num_layers


def _tp_box(shape: tuple[int, ...], kind: str, tp_rank: int, tp: int) -> Optional[Box]:
    if kind not in TP_KINDS:
        raise ValueError(f"unknown tp kind {kind!r} (known: {', '.join(TP_KINDS)})")
    full = Box.full(shape)
    if kind == "replicate" or tp == 1:
        return full
    dim = 0 if kind == "colwise" else 1
    if len(shape) <= dim:
        raise ValueError(f"{kind} needs a tensor with more than {dim} dims, got shape {shape}")
    cb = chunk_bounds(shape[dim], tp, tp_rank)
    if cb is None:
        return None
    return Box(full.bounds[:dim] + (cb,) + full.bounds[dim + 1:])


def _tp_pieces(shape: tuple[int, ...], kind: str, tp_rank: int, tp: int) -> list[Box]:
    """The boxes one tensor-parallel rank holds: one, or for `fused3` (a tensor whose last
    dim is three equal blocks, each split over tp: GPT-2's fused c_attn as megatron-core
    splits its q, k, v heads) three."""
    if kind != "fused3" or tp == 1:
        box = _tp_box(shape, "replicate" if kind == "fused3" else kind, tp_rank, tp)
        return [box] if box is not None else []
    last = len(shape) - 1
    block = shape[last] // 3
    if block * 3 != shape[last]:
        raise ValueError(f"fused3 needs a last dim divisible by 3, got shape {shape}")
    full = Box.full(shape)
    out = []
    for j in range(3):
        cb = chunk_bounds(block, tp, tp_rank)
        if cb is not None:
            out.append(Box(full.bounds[:last] + ((j * block + cb[0], j * block + cb[1]),)))
    return out


def _zero_piece(local: Box, dp_rank: int, dp: int, fmt: str, shape) -> Optional[Piece]:
    if fmt == "flat":   # DeepSpeed ZeRO-3: ceil(numel/dp) elements per rank, padded at the end
        per = -(-local.size // dp)
        within = None if local == Box.full(shape) else local
        return FlatRange(dp_rank * per, (dp_rank + 1) * per, within)
    if local.ndim == 0:   # FSDP2 cannot chunk a scalar: keep it whole on every rank
        return local
    cb = chunk_bounds(local.extents[0], dp, dp_rank)   # FSDP2 fully_shard: Shard(0) chunks
    if cb is None:
        return None
    lo = local.bounds[0][0]
    return Box(((lo + cb[0], lo + cb[1]),) + local.bounds[1:])


def layout_for(param_name: str, shape: Sequence[int], mesh: DeviceMesh, strategy: Strategy,
               kind: str, *, layer_index: Optional[int] = None, num_layers: int = 1,
               zero_format: str = "flat") -> TensorLayout:
    """Layout of one weight under `strategy` on `mesh` (mesh rank r ↔ strategy.coords(r)).

    tp splits by `kind`; dp ranks hold replicas unless ZeRO-3, which shards the tp-local
    tensor over dp as flat slices (`zero_format="flat"`, DeepSpeed) or even dim-0 chunks
    (`"dim0"`, FSDP2); pp keeps the param only on the stage of `layer_index`.
    """
    shape = tuple(int(n) for n in shape)
    if mesh.size != strategy.world:
        raise ValueError(f"{param_name}: mesh has {mesh.size} GPUs, strategy "
                         f"{strategy.text()} needs {strategy.world}")
    if zero_format not in ZERO_FORMATS:
        raise ValueError(f"unknown zero_format {zero_format!r} (known: {', '.join(ZERO_FORMATS)})")
    stage = stage_of(layer_index, num_layers, strategy.pp)
    pieces: list[tuple[int, Piece]] = []
    for rank, gpu in enumerate(mesh.gpus):
        dp, pp, tp = strategy.coords(rank)
        if stage is not None and pp != stage:
            continue
        for box in _tp_pieces(shape, kind, tp, strategy.tp):
            piece: Optional[Piece] = box
            if strategy.zero == 3 and strategy.dp > 1:
                piece = _zero_piece(box, dp, strategy.dp, zero_format, shape)
            if piece is not None:
                pieces.append((gpu, piece))
    return TensorLayout(shape, tuple(pieces))


# -- whole models ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One weight: name, global shape, tensor-parallel kind, layer (−1 = before layer 0,
    num_layers = after the last, None = on every pipeline stage)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    layer_index: Optional[int] = None


@dataclass(frozen=True)
class ModelLayout:
    """param name → TensorLayout, in parameter order."""

    params: tuple[tuple[str, TensorLayout], ...]

    def __post_init__(self) -> None:
        names = [n for n, _ in self.params]
        if len(set(names)) != len(names):
            raise ValueError("model layout repeats a parameter name")

    def __getitem__(self, name: str) -> TensorLayout:
        for n, lay in self.params:
            if n == name:
                return lay
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(n == name for n, _ in self.params)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.params)

    def items(self) -> tuple[tuple[str, TensorLayout], ...]:
        return self.params

    @property
    def numel(self) -> int:
        return sum(lay.numel for _, lay in self.params)

    def elements_on(self, gpu: int) -> int:
        return sum(lay.elements_on(gpu) for _, lay in self.params)


def model_layout(params: Sequence[ParamSpec], mesh: DeviceMesh, strategy: Strategy, *,
                 num_layers: int, zero_format: str = "flat") -> ModelLayout:
    return ModelLayout(tuple(
        (p.name, layout_for(p.name, p.shape, mesh, strategy, p.kind, layer_index=p.layer_index,
                            num_layers=num_layers, zero_format=zero_format))
        for p in params))


def llama_params(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, *,
                 tie_embeddings: bool = False, vocab_parallel: bool = True,
                 head_dim: Optional[int] = None, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm: bool = False, mlp_bias: bool = False
                 ) -> tuple[ParamSpec, ...]:
    """Weights of HF `LlamaForCausalLM` (and Mistral / Qwen2 / Qwen3) in state_dict order,
    with Megatron-style TP kinds (Shoeybi et al. 2019): q/k/v/gate/up colwise, o/down
    rowwise, norms replicated, embedding and lm_head vocab-parallel (dim 0) unless
    `vocab_parallel=False`. `head_dim` (default hidden / heads; Qwen3's differs), Qwen2's
    q/k/v biases (`qkv_bias`: colwise, each rank's rows are its heads, as the weights'),
    Llama's o_proj bias (`o_bias`, attention_bias: replicated) and MLP biases
    (`mlp_bias`: gate/up colwise, down replicated), Qwen3's per-head q/k RMSNorm weights
    (`qk_norm`: [head_dim], replicated)."""
    if heads % kv_heads or (head_dim is None and hidden % heads):
        raise ValueError(f"hidden {hidden} / heads {heads} / kv_heads {kv_heads} do not divide")
    d = head_dim or hidden // heads
    q, kv = heads * d, kv_heads * d
    vk = "colwise" if vocab_parallel else "replicate"
    out = [ParamSpec("model.embed_tokens.weight", (vocab, hidden), vk, -1)]
    for i in range(layers):
        p = f"model.layers.{i}."
        for x, rows in (("q", q), ("k", kv), ("v", kv)):
            out.append(ParamSpec(p + f"self_attn.{x}_proj.weight", (rows, hidden), "colwise", i))
            if qkv_bias:
                out.append(ParamSpec(p + f"self_attn.{x}_proj.bias", (rows,), "colwise", i))
        out.append(ParamSpec(p + "self_attn.o_proj.weight", (hidden, q), "rowwise", i))
        if o_bias:   # Llama attention_bias: added once after the row-parallel reduction
            out.append(ParamSpec(p + "self_attn.o_proj.bias", (hidden,), "replicate", i))
        if qk_norm:
            out += [ParamSpec(p + f"self_attn.{x}_norm.weight", (d,), "replicate", i)
                    for x in "qk"]
        for x in ("gate", "up"):
            out.append(ParamSpec(p + f"mlp.{x}_proj.weight", (ffn, hidden), "colwise", i))
            if mlp_bias:
                out.append(ParamSpec(p + f"mlp.{x}_proj.bias", (ffn,), "colwise", i))
        out.append(ParamSpec(p + "mlp.down_proj.weight", (hidden, ffn), "rowwise", i))
        if mlp_bias:
            out.append(ParamSpec(p + "mlp.down_proj.bias", (hidden,), "replicate", i))
        out += [ParamSpec(p + "input_layernorm.weight", (hidden,), "replicate", i),
                ParamSpec(p + "post_attention_layernorm.weight", (hidden,), "replicate", i)]
    out.append(ParamSpec("model.norm.weight", (hidden,), "replicate", layers))
    if not tie_embeddings:
        out.append(ParamSpec("lm_head.weight", (vocab, hidden), vk, layers))
    return tuple(out)


def spec_params(spec: Any, vocab_parallel: bool = True) -> tuple[ParamSpec, ...]:
    """llama_params of a llama-family graphrl.types.ModelSpec (its head_dim and biases)."""
    return llama_params(spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads,
                        spec.intermediate_size, spec.vocab_size,
                        tie_embeddings=spec.tie_embeddings, vocab_parallel=vocab_parallel,
                        head_dim=spec.head_dim, qkv_bias=spec.qkv_bias, o_bias=spec.o_bias,
                        mlp_bias=spec.mlp_bias, qk_norm=spec.qk_norm)


_MEGATRON_KINDS = (   # (pattern, kind, layer: "i" = the matched layer, -1 first, "L" last)
    (r"(embed_tokens|wte)\.weight$", "colwise", -1),
    (r"wpe\.weight$", "replicate", -1),
    (r"\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$", "colwise", "i"),   # fused per head
    (r"\.(\d+)\.self_attn\.o_proj\.weight$", "rowwise", "i"),
    (r"\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)$", "colwise", "i"),
    (r"\.(\d+)\.mlp\.down_proj\.weight$", "rowwise", "i"),
    (r"\.(\d+)\.attn\.c_attn\.(weight|bias)$", "fused3", "i"),
    (r"\.(\d+)\.attn\.c_proj\.weight$", "colwise", "i"),    # Conv1D [in, out]: row-parallel
    (r"\.(\d+)\.mlp\.c_fc\.weight$", "rowwise", "i"),       # Conv1D: column-parallel
    (r"\.(\d+)\.mlp\.c_fc\.bias$", "colwise", "i"),
    (r"\.(\d+)\.mlp\.c_proj\.weight$", "colwise", "i"),
    (r"\.(\d+)\.", "replicate", "i"),            # norms (q/k norms too), row-parallel biases
    (r"^lm_head\.weight$", "colwise", "L"),
    (r"", "replicate", "L"),                                      # final norm, scalar head
)


def megatron_params(shapes: Sequence[tuple[str, Sequence[int]]], num_layers: int
                    ) -> tuple[ParamSpec, ...]:
    """The HF weights of a Llama-family (Llama, Mistral, Qwen2, Qwen3) or GPT-2 model (any
    head) with the tensor-parallel kind and layer megatron-core gives them
    (backends/engines/megatron_convert.py), in HF coordinates: a rank's q, k and v rows
    and q/k/v bias entries are contiguous there (its query groups: megatron fuses them per
    group in linear_qkv), Qwen3's q/k norm weights are replicated, GPT-2's
    fused c_attn is three blocks (`fused3`), Conv1D weights are transposed."""
    import re

    out = []
    for name, shape in shapes:
        for pattern, kind, layer in _MEGATRON_KINDS:
            m = re.search(pattern, name)
            if m:
                idx = (int(m.group(1)) if layer == "i" else num_layers if layer == "L"
                       else layer)
                out.append(ParamSpec(name, tuple(shape), kind, idx))
                break
    return tuple(out)


__all__ = ["megatron_params", "Box", "FlatRange", "Piece", "TensorLayout", "ParamSpec", "ModelLayout", "TP_KINDS",
           "ZERO_FORMATS", "region_size", "region_intersect", "region_subtract",
           "flat_to_boxes", "flat_intervals", "split_region", "piece_region",
           "piece_local_shape", "chunk_bounds", "stage_of", "layout_for", "model_layout",
           "llama_params", "spec_params"]
