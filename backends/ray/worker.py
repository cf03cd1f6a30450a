"""`RankWorker`: the process of one GPU rank. Ray runs it as an actor (`group.RankGroup`);
it is a plain class, so a test or another launcher can run it in any process.

A worker holds the engines of the models colocated on its GPU, by name, and takes part
in torch.distributed groups with the other ranks: the world group of every rank (world
rank == global GPU id) and named sub-groups for meshes. Setting up the world group takes
two steps from the driver: rank 0 `open_store()` (a TCP store on a free port, returned),
then every rank `init_process_group(host, port)` at once. `new_group` is a collective of
the whole world (torch.distributed requires every rank to create every group, members or
not, in the same order). Every blocking step has a timeout.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from graphrl.errors import UsageError
from graphrl.graph import ModelDecl
from graphrl.shard import ModelLayout

from .reshard import AnyPlan, ReshardStats, execute_plan, plan_items
from .sharded import FSDPEngine, ReplicatedEngine, ShardBuffers

WORLD = "world"


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise UsageError(f"unknown dtype {name!r}")
    return dt


class RankWorker:
    """One GPU rank: engines by model name, process groups by name."""

    def __init__(self, rank: int, world_size: int, *, device: str = "cpu",
                 num_threads: int = 1, env: Optional[Mapping[str, str]] = None):
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} outside a world of {world_size}")
        self.rank, self.world_size, self.device = rank, world_size, device
        os.environ.update(env or {})   # this process only: e.g. GLOO_SOCKET_IFNAME=lo
        torch.set_num_threads(num_threads)
        self._store: Any = None
        self._groups: dict[str, tuple[tuple[int, ...], Any]] = {}
        self._engines: dict[str, Any] = {}

    # -- identity ---------------------------------------------------------------------------
    def ping(self) -> int:
        return self.rank

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "device": self.device,
                "models": sorted(self._engines), "groups": sorted(self._groups),
                "threads": torch.get_num_threads(),
                "initialized": dist.is_available() and dist.is_initialized()}

    # -- process groups ---------------------------------------------------------------------
    def open_store(self, host: str = "127.0.0.1", timeout_s: float = 60.0) -> int:
        """Rank 0: start the TCP store the world meets at, on a free port; returns it."""
        if self.rank != 0:
            raise UsageError(f"rank {self.rank}: only rank 0 opens the store")
        self._store = dist.TCPStore(host, 0, self.world_size, True,
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    wait_for_workers=False)
        return int(self._store.port)

    def init_process_group(self, host: str, port: int, timeout_s: float = 60.0) -> None:
        """Join the world group (gloo on CPU; gloo + NCCL on CUDA). Every rank calls this
        at the same time; it returns when all have joined or raises after `timeout_s`."""
        if dist.is_initialized():
            raise UsageError(f"rank {self.rank}: process group already initialised")
        if self.rank == 0 and self._store is None:
            raise UsageError("rank 0: call open_store() before init_process_group()")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = self._store if self.rank == 0 else dist.TCPStore(
            host, port, self.world_size, False, timeout=timeout)
        os.environ.setdefault("MASTER_ADDR", host)
        os.environ.setdefault("MASTER_PORT", str(port))
        backend = "gloo" if self.device == "cpu" else "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, store=store, rank=self.rank,
                                world_size=self.world_size, timeout=timeout)
        self._groups[WORLD] = (tuple(range(self.world_size)), dist.group.WORLD)

    def new_group(self, name: str, ranks: Sequence[int], timeout_s: float = 60.0) -> bool:
        """Create sub-group `name` of `ranks` (a world collective); True if a member."""
        if name in self._groups:
            raise UsageError(f"rank {self.rank}: group {name!r} exists")
        ranks = tuple(int(r) for r in ranks)
        pg = dist.new_group(list(ranks), timeout=datetime.timedelta(seconds=timeout_s))
        member = self.rank in ranks
        self._groups[name] = (ranks, pg if member else None)
        return member

    def _group(self, name: str) -> tuple[tuple[int, ...], Any]:
        try:
            ranks, pg = self._groups[name]
        except KeyError:
            raise UsageError(f"rank {self.rank}: no process group {name!r} "
                             f"(known: {', '.join(sorted(self._groups)) or 'none'})") from None
        if pg is None:
            raise UsageError(f"rank {self.rank} is not a member of group {name!r} {ranks}")
        return ranks, pg

    def barrier(self, group: str = WORLD, timeout_s: float = 60.0) -> None:
        _, pg = self._group(group)
        work = dist.barrier(group=pg, async_op=True)
        work.wait(datetime.timedelta(seconds=timeout_s))

    def destroy(self) -> None:
        """Leave every process group and drop every engine."""
        self._engines.clear()
        self._groups.clear()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None

    # -- engines ----------------------------------------------------------------------------
    def _add(self, model: str, engine: Any) -> None:
        if model in self._engines:
            raise UsageError(f"rank {self.rank}: model {model!r} already has an engine")
        self._engines[model] = engine

    def engine(self, model: str) -> Any:
        try:
            return self._engines[model]
        except KeyError:
            raise UsageError(f"rank {self.rank}: no engine for model {model!r} (here: "
                             f"{', '.join(sorted(self._engines)) or 'none'})") from None

    def build_fsdp_engine(self, model: str, decl: ModelDecl, options: Mapping[str, Any],
                          group: str, *, seed: int = 0) -> ModelLayout:
        """An FSDP2 training engine over the ranks of `group` (a collective over them);
        returns its layout."""
        ranks, pg = self._group(group)
        eng = FSDPEngine(decl, options, ranks, self.rank, pg, device=self.device, seed=seed)
        self._add(model, eng)
        return eng.layout

    def build_replicated_engine(self, model: str, decl: ModelDecl, options: Mapping[str, Any],
                                gpus: Sequence[int], *, seed: int = 0) -> ModelLayout:
        """A full copy of the model on this rank, one of the replicas on `gpus`."""
        eng = ReplicatedEngine(decl, options, gpus, self.rank, device=self.device, seed=seed)
        self._add(model, eng)
        return eng.layout

    def build_buffers(self, model: str, layout: ModelLayout, dtype: str = "float32") -> None:
        """Plain zeroed arrays of any layout (no model), e.g. a tensor-parallel target."""
        dev = "cpu" if self.device == "cpu" else "cuda"
        self._add(model, ShardBuffers(layout, self.rank, dtype=_dtype(dtype), device=dev))

    def drop_engine(self, model: str) -> None:
        self.engine(model)
        del self._engines[model]

    def version(self, model: str) -> int:
        return int(self.engine(model).version)

    def layout(self, model: str) -> ModelLayout:
        return self.engine(model).layout

    def train(self, model: str, inputs: Mapping[str, Mapping[str, Any]], **kw: Any
              ) -> dict[str, float]:
        """Train on this rank's slice of the batch (FSDP: every mesh rank calls it)."""
        return self.engine(model).train(inputs, **kw)

    def forward(self, model: str, rollout: Mapping[str, Any]) -> dict[str, Any]:
        return self.engine(model).forward(rollout)

    def generate(self, model: str, prompts: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
        return self.engine(model).generate(prompts, **kw)

    def export_weights(self, model: str) -> dict[str, torch.Tensor]:
        """Full weights (FSDP: an all-gather over the mesh, every mesh rank calls it)."""
        return self.engine(model).export_weights()

    def load_weights(self, model: str, named: Mapping[str, torch.Tensor]) -> None:
        self.engine(model).load_weights(named)

    def export_shards(self, model: str) -> dict[str, list[torch.Tensor]]:
        """Copies of this rank's local arrays, in the order of `layout(model)` pieces."""
        return {k: [a.detach().cpu().clone() for a in v]
                for k, v in self.engine(model).local_arrays().items()}

    def offload(self, model: str) -> None:
        self.engine(model).offload()

    def onload(self, model: str) -> None:
        self.engine(model).onload()

    # -- resharding -------------------------------------------------------------------------
    def reshard(self, plan: AnyPlan, src_model: str, dst_model: str, *,
                buckets: Optional[Sequence[Any]] = None, wire_dtype: str = "float32",
                group: str = WORLD, timeout_s: float = 60.0) -> ReshardStats:
        """This rank's part of `plan`: send what it names from `src_model`'s arrays,
        receive and write into `dst_model`'s arrays. Every GPU of the plan calls it
        (reshard.participants) with the same plan and buckets."""
        _, pg = self._group(group)
        items = plan_items(plan)
        is_src = any(self.rank in p.src.gpus for _, p in items)
        is_dst = any(self.rank in p.dst.gpus for _, p in items)
        src = self.engine(src_model).local_arrays() if is_src else {}
        dst = self.engine(dst_model).local_arrays() if is_dst else {}
        return execute_plan(plan, self.rank, src, dst, group=pg, buckets=buckets,
                            wire_dtype=_dtype(wire_dtype), timeout_s=timeout_s)


__all__ = ["RankWorker", "WORLD"]
