"""Checkpoints of a RayExecutor (graphrl.checkpoint): each rank writes in parallel.

Saving: every rank writes its RNG states (rng/rank<R>.pt); each model's own engine
(the one that trains it) writes its state from its first rank, as full tensors in the
placement-independent form of engines/engine_state.py (FSDP2 all-gathers its shards over
the mesh first; engines on disjoint meshes write at the same time). Generation engines
(`policy.gen`) write nothing: each step reshards the trained weights into them before
they generate.

Loading: every engine of a model loads models/<model>.pt: the whole state into the
model's own engine (FSDP2 keeps its shards of it), the weights into a generation engine;
so a checkpoint resumes onto any placement, cluster or backend (the plan is recompiled
for this run; local checkpoints load here and Ray ones on the local backend).
Megatron-core and DeepSpeed engines have no state_dict in this form yet: a run using
them with --checkpoint-dir is refused before it starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from graphrl.errors import UsageError

from .group import gather

SUPPORTED = ("replicas", "fsdp", "noop")


def check_checkpointable(ex: Any) -> None:
    for key, spec in sorted(ex.engines.specs.items()):
        if spec.kind not in SUPPORTED:
            raise UsageError(f"--checkpoint-dir/--resume: engine {key} runs on {spec.kind} "
                             f"(GPUs {list(spec.gpus)}); checkpoints cover hf engines "
                             "(replicas, FSDP2) on Ray so far: pin its calls to zero=0 or "
                             "zero=3 (--placement), or run --backend local")


def model_shapes(ex: Any) -> dict[str, dict[str, list[int]]]:
    from .sharded import param_specs

    return {name: {p.name: list(p.shape) for p in param_specs(m.decl())}
            for name, m in sorted(ex.program.models.items())}


def save_state(ex: Any, folder: Path) -> dict[str, Any]:
    """Every rank writes its part into `folder` at once; returns the placement summary."""
    check_checkpointable(ex)
    own = {k: s for k, s in ex.engines.specs.items() if k == s.decl.name and s.kind != "noop"}
    per_rank: dict[int, list[tuple[str, bool]]] = {r: [] for r in ex.group.actors}
    for key in sorted(own):
        spec = own[key]
        for r in spec.gpus:
            if spec.kind == "fsdp" or r == spec.gpus[0]:
                per_rank[r].append((key, r == spec.gpus[0]))
    refs = {r: ex.group.actors[r].save_state.remote(str(folder), per_rank[r])
            for r in sorted(per_rank)}
    gather(refs, "save_state", ex.timeout_s)
    return {"backend": "ray", "cluster": ex.plan.cluster.text(),
            "calls": {n.call: f"{n.placement.mesh.text()} {n.placement.strategy.text()}"
                      for n in ex.graph.nodes if n.placement is not None
                      and hasattr(n.placement.strategy, "text")},
            "engines": {k: {"kind": s.kind, "gpus": list(s.gpus)}
                        for k, s in sorted(ex.engines.specs.items())}}


def load_state(ex: Any, ckpt: Any) -> None:
    """Every rank loads its engines' states from a verified checkpoint."""
    check_checkpointable(ex)
    per_rank: dict[int, list[tuple[str, str]]] = {r: [] for r in ex.group.actors}
    for key in sorted(ex.engines.specs):
        spec = ex.engines.specs[key]
        if spec.kind == "noop":
            continue
        if not ckpt.file(f"models/{spec.decl.name}.pt").is_file():
            raise UsageError(f"checkpoint {ckpt.path}: no models/{spec.decl.name}.pt")
        for r in spec.gpus:
            per_rank[r].append((key, spec.decl.name))
    refs = {r: ex.group.actors[r].load_state.remote(str(ckpt.path), per_rank[r])
            for r in sorted(per_rank)}
    versions: dict[str, int] = {}
    for loaded in gather(refs, "load_state", ex.timeout_s).values():
        versions.update(loaded)
    for key, spec in ex.engines.specs.items():
        ex.versions[key] = versions.get(spec.decl.name, ex.versions[key])
    ex._carried = None


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
