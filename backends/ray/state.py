"""Checkpoints of a RayExecutor (graphrl.checkpoint): each rank writes in parallel.

Saving: every rank writes its RNG states (rng/rank<R>.pt). Each model's own engine (the
one that trains it) writes its state:
- megatron-core and DeepSpeed engines: every rank its own shard, models/<model>/rank<R>.pt,
  and the engine's first rank models/<model>/index.json (engines/shard_state.py: weights
  and Adam moments by parameter name, how each is split, the step count);
- HF engines: the first rank models/<model>.pt, full tensors in the placement-independent
  form of engines/engine_state.py (FSDP2 all-gathers its shards over the mesh first).
A LoRA model's engine writes its peft module's weights (base and adapters) and the
adapters' Adam state; a shared base (LoRA) writes what the local backend's does, the
name of its owner and a version, no weights. Engines on disjoint meshes write at the
same time. Generation engines (`policy.gen`)
write nothing: each step reshards the trained weights into them before they generate.
An asynchronous run (--staleness K) also writes the rollouts queued on the driver,
carried.pt (the local backend's CARRIED_FILE: either backend resumes the other's).

Loading: every engine of a model reads the model's full state (one file, or the shards
put together, each file checked against the index) and takes its part: the whole state
into the model's own engine (FSDP2 its dim-0 shards, megatron its tp x pp slices and its
ZeRO-1 share of the moments, DeepSpeed its ZeRO partitions), the weights into a
generation engine; so a checkpoint resumes onto any placement, cluster, engine or
backend (the plan is recompiled for this run; local checkpoints load here and Ray ones
on the local backend).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from graphrl.errors import UsageError

from graphrl.backends.local import CARRIED_FILE

from .group import gather

SUPPORTED = ("replicas", "fsdp", "megatron", "deepspeed", "noop")
SHARDED = ("megatron", "deepspeed")   # each rank writes its own shard


def check_checkpointable(ex: Any) -> None:
    for key, spec in sorted(ex.engines.specs.items()):
        if spec.kind not in SUPPORTED:
            raise UsageError(f"--checkpoint-dir/--resume: engine {key} runs on {spec.kind} "
                             f"(GPUs {list(spec.gpus)}); checkpoints cover the engine "
                             f"kinds {', '.join(SUPPORTED)}")


def model_shapes(ex: Any) -> dict[str, dict[str, list[int]]]:
    """Model -> parameter name -> shape, as the local backend lists them (LoRA: the peft
    module's names; a shared base: its owner's module, which it runs on)."""
    from .sharded import param_specs

    models = ex.program.models
    return {name: {p.name: list(p.shape) for p in param_specs(
                   models[m.shares_base or name].decl(),
                   checkpoint=models[m.shares_base or name].checkpoint)}
            for name, m in sorted(models.items())}


def save_state(ex: Any, folder: Path) -> dict[str, Any]:
    """Every rank writes its part into `folder` at once; returns the placement summary."""
    check_checkpointable(ex)
    own = {k: s for k, s in ex.engines.specs.items() if k == s.decl.name and s.kind != "noop"}
    per_rank: dict[int, list[tuple[str, bool]]] = {r: [] for r in ex.group.actors}
    for key in sorted(own):
        spec = own[key]
        for r in spec.gpus:
            if spec.kind in ("fsdp",) + SHARDED or r == spec.gpus[0]:
                per_rank[r].append((key, r == spec.gpus[0]))
    refs = {r: ex.group.actors[r].save_state.remote(str(folder), per_rank[r])
            for r in sorted(per_rank)}
    gather(refs, "save_state", ex.timeout_s)
    save_carried(ex, folder)
    return {"backend": "ray", "cluster": ex.plan.cluster.text(),
            "calls": {n.call: f"{n.placement.mesh.text()} {n.placement.strategy.text()}"
                      for n in ex.graph.nodes if n.placement is not None
                      and hasattr(n.placement.strategy, "text")},
            "engines": {k: {"kind": s.kind, "gpus": list(s.gpus)}
                        for k, s in sorted(ex.engines.specs.items())}}


def load_state(ex: Any, ckpt: Any) -> None:
    """Every rank loads its engines' states from a verified checkpoint."""
    from graphrl.backends.engines.shard_state import has_model_state

    check_checkpointable(ex)
    per_rank: dict[int, list[tuple[str, str]]] = {r: [] for r in ex.group.actors}
    for key in sorted(ex.engines.specs):
        spec = ex.engines.specs[key]
        if spec.kind == "noop":
            continue
        if not has_model_state(ckpt.path / "models", spec.decl.name):
            raise UsageError(f"checkpoint {ckpt.path}: no state of model {spec.decl.name} "
                             f"(models/{spec.decl.name}.pt or models/{spec.decl.name}/)")
        for r in spec.gpus:
            per_rank[r].append((key, spec.decl.name))
    refs = {r: ex.group.actors[r].load_state.remote(str(ckpt.path), per_rank[r])
            for r in sorted(per_rank)}
    versions: dict[str, int] = {}
    for loaded in gather(refs, "load_state", ex.timeout_s).values():
        versions.update(loaded)
    for key, spec in ex.engines.specs.items():
        ex.versions[key] = versions.get(spec.decl.name, ex.versions[key])
    ex._carried = None   # weights enter the next step at the restored versions
    ex._carried_data = {}
    if ckpt.file(CARRIED_FILE).is_file():
        from graphrl.checkpoint import load_torch

        ex._carried_data = dict(load_torch(ckpt.file(CARRIED_FILE)))


def save_carried(ex: Any, folder: Path) -> None:
    """An async run's rollouts generated but not trained on yet (driver-side payloads),
    as the local backend writes them."""
    if ex._carried_data:
        from graphrl.checkpoint import save_torch

        save_torch(dict(ex._carried_data), folder / CARRIED_FILE)


def lost_ranks(ex: Any, wait_s: float = 5.0) -> list[int]:
    """Ranks whose actor process is gone (a ping fails at once; a rank still busy, e.g.
    blocked in a collective with a dead peer, is not lost)."""
    import ray

    if ex.group is None:
        return []
    refs = {ex.group.actors[r].ping.remote(): r for r in sorted(ex.group.actors)}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
    dead = []
    for ref in ready:
        try:
            ray.get(ref, timeout=1.0)
        except ray.exceptions.RayActorError:
            dead.append(refs[ref])
        except Exception:   # noqa: BLE001  any other answer: the process is there
            pass
    return sorted(dead)


class CheckpointMethods:
    """RayExecutor's checkpoint methods (the runner calls them; graphrl.checkpoint_run)."""

    def model_shapes(self) -> dict[str, dict[str, list[int]]]:
        return model_shapes(self)

    def save_state(self, folder: Any) -> dict[str, Any]:
        return save_state(self, Path(folder))

    def load_state(self, ckpt: Any) -> None:
        load_state(self, ckpt)

    def check_checkpointable(self) -> None:
        check_checkpointable(self)

    def lost_ranks(self) -> list[int]:
        return lost_ranks(self)


__all__ = ["CheckpointMethods", "lost_ranks", "check_checkpointable", "model_shapes", "save_state", "load_state"]
