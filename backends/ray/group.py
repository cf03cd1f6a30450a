"""The driver's handle to the rank actors: start them, call them, and turn every failure
into an error that names the rank.

Rules the calls keep:
- every call has a deadline (`timeout_s`, default the group's); results come back as a
  dict rank -> value;
- results are collected in completion order (`ray.wait`), so one rank that died or
  raised is reported at once, not after the ranks before it finish (a collective whose
  peer died would otherwise hang its other ranks until the process-group timeout);
- a WorkerError names the failing rank, the method and the ranks still running.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence

import ray

from graphrl.errors import ExecutionError

from .worker import WORLD, RankWorker

GRACE_S = 10.0   # driver deadline past a worker-side timeout, so the worker's error wins


class WorkerError(ExecutionError):
    """A rank's call raised, or its actor died."""

    def __init__(self, message: str, rank: Optional[int], method: str):
        self.rank, self.method = rank, method
        super().__init__(message)


class WorkerTimeout(WorkerError):
    """Ranks did not answer before the deadline (`ranks` lists them)."""

    def __init__(self, message: str, ranks: Sequence[int], method: str):
        self.ranks = tuple(ranks)
        super().__init__(message, self.ranks[0] if self.ranks else None, method)


def gather(refs: Mapping[int, Any], method: str, timeout_s: float) -> dict[int, Any]:
    """Results of one call per rank (`refs`: rank -> ObjectRef), or the first failure."""
    rank_of = {ref: rank for rank, ref in refs.items()}
    pending = list(refs.values())
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0.0))
        if not ready:
            late = sorted(rank_of[r] for r in pending)
            raise WorkerTimeout(f"{method}: ranks {late} did not answer within "
                                f"{timeout_s:g} s", late, method)
        for ref in ready:
            rank = rank_of[ref]
            running = sorted(rank_of[r] for r in pending)
            try:
                out[rank] = ray.get(ref, timeout=max(deadline - time.monotonic(), 1.0))
            except ray.exceptions.RayActorError as e:
                raise WorkerError(f"rank {rank}: worker died during {method} (still "
                                  f"running: {running}): {_first_line(e)}", rank,
                                  method) from None
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None) or e
                raise WorkerError(f"rank {rank}: {method} failed (still running: "
                                  f"{running}): {type(cause).__name__}: {cause}", rank,
                                  method) from cause
            except ray.exceptions.GetTimeoutError:
                raise WorkerTimeout(f"{method}: rank {rank} did not answer within "
                                    f"{timeout_s:g} s", [rank], method) from None
    return dict(sorted(out.items()))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class RankGroup:
    """One RankWorker actor per rank 0..n-1 (rank == global GPU id)."""

    def __init__(self, actors: Mapping[int, Any], *, timeout_s: float = 120.0):
        self.actors = dict(sorted(actors.items()))
        self.timeout_s = timeout_s

    @classmethod
    def spawn(cls, world_size: int, *, placement_group: Any = None, num_gpus: float = 1.0,
              num_cpus: float = 0.1, device: str = "cpu", num_threads: int = 1,
              env: Optional[Mapping[str, str]] = None, timeout_s: float = 120.0,
              worker: Any = RankWorker) -> "RankGroup":
        """Start the actors (rank i in bundle i of `placement_group` when given) and wait
        until each answers. `worker`: the actor class (RankWorker or a subclass, e.g.
        runtime.ExecWorker, which builds megatron / DeepSpeed engines from an EngineSpec)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_cls = ray.remote(worker)
        actors = {}
        for rank in range(world_size):
            opts: dict[str, Any] = {"num_gpus": num_gpus, "num_cpus": num_cpus,
                                    "max_restarts": 0, "max_task_retries": 0}
            if placement_group is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=rank)
            actors[rank] = actor_cls.options(**opts).remote(
                rank, world_size, device=device, num_threads=num_threads, env=dict(env or {}))
        group = cls(actors, timeout_s=timeout_s)
        try:
            group.call("ping")
        except WorkerError:
            group.shutdown()
            raise
        return group

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(self.actors)

    def call(self, method: str, *args: Any, on: Optional[Sequence[int]] = None,
             deadline_s: Optional[float] = None, **kwargs: Any) -> dict[int, Any]:
        """`method(*args, **kwargs)` on every rank of `on` (default all) at once, waiting
        at most `deadline_s` (default the group's timeout). The two names are the
        driver's; every other keyword goes to the method (e.g. its own `timeout_s`)."""
        ranks = self.ranks if on is None else tuple(on)
        refs = {r: getattr(self._actor(r), method).remote(*args, **kwargs) for r in ranks}
        return gather(refs, method, self.timeout_s if deadline_s is None else deadline_s)

    def call_each(self, method: str, per_rank: Mapping[int, tuple[Sequence[Any],
                                                                  Mapping[str, Any]]],
                  *, deadline_s: Optional[float] = None) -> dict[int, Any]:
        """`method` on each rank of `per_rank` with that rank's (args, kwargs), at once."""
        refs = {r: getattr(self._actor(r), method).remote(*a, **kw)
                for r, (a, kw) in per_rank.items()}
        return gather(refs, method, self.timeout_s if deadline_s is None else deadline_s)

    def _actor(self, rank: int) -> Any:
        try:
            return self.actors[rank]
        except KeyError:
            raise WorkerError(f"rank {rank}: no such worker (ranks {list(self.actors)})",
                              rank, "") from None

    # -- process groups ---------------------------------------------------------------------
    def init_process_group(self, host: str = "127.0.0.1", *,
                           timeout_s: Optional[float] = None) -> None:
        """The world group of every rank: rank 0 opens the store, then all join."""
        t = self.timeout_s if timeout_s is None else timeout_s
        port = self.call("open_store", host, timeout_s=t, on=[0], deadline_s=t + GRACE_S)[0]
        self.call("init_process_group", host, port, timeout_s=t, deadline_s=t + GRACE_S)

    def new_group(self, name: str, ranks: Sequence[int], *,
                  timeout_s: Optional[float] = None) -> None:
        """Sub-group `name` of `ranks` (every rank of the world takes part)."""
        t = self.timeout_s if timeout_s is None else timeout_s
        self.call("new_group", name, list(ranks), timeout_s=t, deadline_s=t + GRACE_S)

    # -- resharding -------------------------------------------------------------------------
    def reshard(self, plan: Any, src_model: str, dst_model: str, *,
                buckets: Optional[Sequence[Any]] = None, wire_dtype: str = "float32",
                group: str = WORLD, timeout_s: Optional[float] = None) -> dict[int, Any]:
        """Run `plan` on every GPU it names; returns rank -> ReshardStats."""
        from .reshard import participants

        t = self.timeout_s if timeout_s is None else timeout_s
        # the workers' own deadline comes first: their error says which transfer stalled
        return self.call("reshard", plan, src_model, dst_model, buckets=buckets,
                         wire_dtype=wire_dtype, group=group, timeout_s=t,
                         on=participants(plan), deadline_s=t + GRACE_S)

    # -- lifetime ---------------------------------------------------------------------------
    def kill(self, rank: int) -> None:
        ray.kill(self._actor(rank), no_restart=True)

    def shutdown(self) -> None:
        """Kill every actor (no graceful step: a rank may be stuck in a collective)."""
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors = {}


__all__ = ["WorkerError", "WorkerTimeout", "gather", "RankGroup"]
