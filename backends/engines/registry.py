"""The engine registry: engine name -> how to build it, for every place that builds one.

The local executor, the Ray workers (`ray.runtime`, `ray.sharded`, the driver's
`DriverEngines`) and the conformance checker (`graphrl check-model`) all build engines
through `create_engine`, so an engine added here is available to all of them. The names
and what each engine can run are the core's (`graphrl.engines.ENGINES`, `can_run`): the
compiler plans with them without importing a backend; this module adds how to build them.
Each builder imports its engine on first use (torch, transformers, megatron-core and
DeepSpeed load only when an engine needs them).

- `hf`, `fast`: one process; every rank of a Ray mesh holds its own (`ray.sharded`
  wraps them in replicas or FSDP2).
- `megatron`, `deepspeed`: one engine spread over a mesh of ranks; they need a `RankMesh`
  (this rank, the mesh's ranks, its process groups, the planned degrees).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from graphrl.engines import ENGINES
from graphrl.errors import UsageError
from graphrl.parallel import Strategy

from .base import ModelEngine


@dataclass(frozen=True)
class RankMesh:
    """Where a multi-rank engine runs: this `rank` among `ranks`, its process groups by
    kind (`mesh`: all of `ranks`; `self`: this rank alone; megatron's `tp`, `pp`, `dp`,
    ... as `megatron.megatron_groups` names them) and the degrees it runs (dp, tp, pp,
    micro-batches, ZeRO stage, optimizer offload)."""

    ranks: tuple[int, ...]
    rank: int
    groups: Mapping[str, Any] = field(default_factory=dict)
    strategy: Strategy = Strategy()
    sequence_parallel: bool = False   # megatron: sequence parallelism (tp > 1)


Builder = Callable[[Any, Mapping[str, Any], str, int, Optional[RankMesh]], ModelEngine]


def _hf(decl: Any, options: Mapping[str, Any], device: str, seed: int,
        mesh: Optional[RankMesh]) -> ModelEngine:
    from .hf import HFEngine

    return HFEngine(decl, options, device=device, seed=seed)


def _fast(decl: Any, options: Mapping[str, Any], device: str, seed: int,
          mesh: Optional[RankMesh]) -> ModelEngine:
    from .fast import FastEngine

    return FastEngine(decl, options, device=device, seed=seed)


def _megatron(decl: Any, options: Mapping[str, Any], device: str, seed: int,
              mesh: Optional[RankMesh]) -> ModelEngine:
    from .megatron import MegatronEngine

    s = _need_mesh("megatron", decl, mesh).strategy
    return MegatronEngine(decl, options, ranks=list(mesh.ranks), rank=mesh.rank,
                          groups=mesh.groups, dp=s.dp, tp=s.tp, pp=s.pp,
                          micro_batches=s.micro_batches, zero=s.zero,
                          sequence_parallel=mesh.sequence_parallel, device=device,
                          seed=seed)


def _deepspeed(decl: Any, options: Mapping[str, Any], device: str, seed: int,
               mesh: Optional[RankMesh]) -> ModelEngine:
    from .deepspeed_engine import DeepSpeedEngine

    s = _need_mesh("deepspeed", decl, mesh).strategy
    return DeepSpeedEngine(decl, options, ranks=list(mesh.ranks), rank=mesh.rank,
                           group=mesh.groups["mesh"], self_group=mesh.groups.get("self"),
                           zero=s.zero, offload=bool(s.offload),
                           micro_batches=s.micro_batches, device=device, seed=seed)


def _need_mesh(engine: str, decl: Any, mesh: Optional[RankMesh]) -> RankMesh:
    if mesh is None:
        raise UsageError(f"model {decl.name}: engine {engine} runs over a mesh of ranks "
                         "(process groups); this executor builds one-process engines only "
                         f"({', '.join(e for e in ENGINES if not MULTI_RANK[e])}): run it "
                         "with --backend ray")
    return mesh


BUILDERS: dict[str, Builder] = {"hf": _hf, "fast": _fast, "megatron": _megatron,
                                "deepspeed": _deepspeed}
MULTI_RANK = {"hf": False, "fast": False, "megatron": True, "deepspeed": True}
PACKAGES = {"megatron": ("megatron", "megatron.core"), "deepspeed": ("deepspeed",)}


def create_engine(engine: str, decl: Any, options: Mapping[str, Any], device: str = "cpu",
                  seed: int = 0, mesh: Optional[RankMesh] = None) -> ModelEngine:
    """Build `engine` for the model `decl` (a ModelDecl) on `device`; multi-rank engines
    (megatron, deepspeed) need `mesh`. An unknown name is a UsageError naming the model."""
    builder = BUILDERS.get(engine)
    if builder is None:
        raise UsageError(f"model {decl.name}: unknown engine {engine!r} (available: "
                         f"{', '.join(ENGINES)})")
    return builder(decl, options, device, seed, mesh)


def installed(engine: str) -> bool:
    """Whether this machine has the packages `engine` needs (hf and fast: always)."""
    return all(importlib.util.find_spec(p) is not None for p in PACKAGES.get(engine, ()))


__all__ = ["RankMesh", "BUILDERS", "MULTI_RANK", "create_engine", "installed"]
