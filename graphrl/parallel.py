"""Device meshes and parallel strategies: where a call runs and how it is split.

A DeviceMesh is an ordered tuple of global GPU ids (node-major: GPU g lives on node
g // gpus_per_node). A Strategy splits a call over that mesh: dp × pp × tp == mesh size,
rank order (dp, pp, tp) with tp fastest, as Megatron-LM orders its groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence


@dataclass(frozen=True)
class DeviceMesh:
    gpus: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.gpus:
            raise ValueError("a device mesh needs at least one GPU")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"device mesh repeats a GPU: {self.gpus}")

    @property
    def size(self) -> int:
        return len(self.gpus)

    @classmethod
    def range(cls, start: int, count: int) -> "DeviceMesh":
        return cls(tuple(range(start, start + count)))

    def overlaps(self, other: "DeviceMesh") -> bool:
        return not self.gpu_set.isdisjoint(other.gpu_set)

    @cached_property
    def gpu_set(self) -> frozenset[int]:
        return frozenset(self.gpus)

    def text(self) -> str:
        """`0-7` for a contiguous range, else `0,2,4`."""
        g = self.gpus
        if len(g) > 1 and g == tuple(range(g[0], g[0] + len(g))):
            return f"{g[0]}-{g[-1]}"
        return ",".join(map(str, g))

    @classmethod
    def parse(cls, text: str) -> "DeviceMesh":
        """Inverse of text(); also accepts lists like `0-3,8-11`."""
        gpus: list[int] = []
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise ValueError(f"bad GPU range {part!r}: end before start")
                gpus.extend(range(int(lo), int(hi) + 1))
            else:
                gpus.append(int(part))
        return cls(tuple(gpus))


@dataclass(frozen=True)
class Strategy:
    """How one call is parallelised over its mesh.

    dp: data-parallel replicas; tp: tensor-parallel degree (Megatron-LM, Shoeybi et al.
    2019); pp: pipeline stages (GPipe / 1F1B); micro_batches: per pipeline or per
    gradient-accumulation step; zero: ZeRO stage 0-3 for training (Rajbhandari et al.
    2020), 0 for inference; recompute: 1 = full activation recomputation (Chen et al.
    2016, "Training Deep Nets with Sublinear Memory Cost"); offload: 1 = the fp32 Adam
    states live in host memory and the optimizer steps on the CPU (ZeRO-Offload, Ren et
    al. 2021).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1
    zero: int = 0
    recompute: int = 0
    offload: int = 0
    engine: str = ""   # the engine that runs it when pinned (graphrl.engines); "" = any

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"strategy {name} must be >= 1, got {getattr(self, name)}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0-3, got {self.zero}")
        for name in ("recompute", "offload"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"strategy {name} must be 0 or 1, got {getattr(self, name)}")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp, pp, tp) coordinates of a mesh-local rank; tp varies fastest."""
        tp = rank % self.tp
        pp = (rank // self.tp) % self.pp
        dp = rank // (self.tp * self.pp)
        return dp, pp, tp

    def text(self) -> str:
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}"]
        if self.micro_batches != 1:
            parts.append(f"mb={self.micro_batches}")
        if self.zero:
            parts.append(f"zero={self.zero}")
        if self.engine:
            parts.append(f"engine={self.engine}")
        if self.recompute:
            parts.append("recompute=1")
        if self.offload:
            parts.append("offload=1")
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str) -> "Strategy":
        keys = {"dp": "dp", "tp": "tp", "pp": "pp", "mb": "micro_batches",
                "micro_batches": "micro_batches", "zero": "zero", "recompute": "recompute",
                "offload": "offload"}
        kw = {}
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            k, _, v = part.partition("=")
            if k == "engine":
                kw["engine"] = v
                continue
            if k not in keys:
                raise ValueError(f"unknown strategy key {k!r} in {text!r}")
            kw[keys[k]] = int(v)
        return cls(**kw)


GROUP_KINDS = ("tp", "pp", "dp", "embd", "cp")


def megatron_groups(gpus: Sequence[int], dp: int, tp: int, pp: int
                    ) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every process group an engine over `gpus` needs, by kind: tensor-, pipeline- and
    data-parallel groups, the embedding groups (first and last stage of each pipeline:
    tied embeddings), and one-rank context-parallel groups (megatron-core asks for one).
    Every rank of the world must create all of them, in this order."""
    if len(gpus) != dp * tp * pp:
        raise ValueError(f"mesh of {len(gpus)} GPUs != dp {dp} x tp {tp} x pp {pp}")

    def at(d: int, p: int, t: int) -> int:
        return gpus[(d * pp + p) * tp + t]

    out: dict[str, list[tuple[int, ...]]] = {k: [] for k in GROUP_KINDS}
    for d in range(dp):
        for p in range(pp):
            out["tp"].append(tuple(at(d, p, t) for t in range(tp)))
        for t in range(tp):
            stages = tuple(at(d, p, t) for p in range(pp))
            out["pp"].append(stages)
            out["embd"].append(tuple(dict.fromkeys((stages[0], stages[-1]))))
    for p in range(pp):
        for t in range(tp):
            out["dp"].append(tuple(at(d, p, t) for d in range(dp)))
    out["cp"] = [(g,) for g in gpus]
    return {k: tuple(v) for k, v in out.items()}
