"""Sharded checkpoints of the megatron-core and DeepSpeed engines, in spawned gloo ranks
(tests/test_checkpoint_engines.py; the process harness of engine_diff.py).

For each engine: train one optimizer step, write the sharded checkpoint (every rank its
shard), train a second step (the uninterrupted run). Then, from the checkpoint:
- the same placement resumes bit for bit (the second step's weights are identical);
- another placement (megatron tp 2 -> tp 1 x dp 2 with ZeRO-1; DeepSpeed ZeRO-2 ->
  ZeRO-3) loads it, writes it again unchanged (the full state read back is identical,
  optimizer moments and step included), and its second step equals the uninterrupted
  one within float tolerance (gradient sums in another order);
- a one-process HF engine loads the same full state and agrees likewise.
Rank 0 writes the measurements to a JSON file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine_diff import (batch, megatron_process_groups, run, spawn,  # noqa: F401  (run: the harness)
                         tiny_decl)

from graphrl.backends.engines.spawn import init_rank


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def _state_diff(a: dict, b: dict) -> str:
    """'' when two full states are identical, else the first difference."""
    import torch

    if list(a["weights"]) != list(b["weights"]) or a["version"] != b["version"]:
        return "names or version"
    for k in a["weights"]:
        if not torch.equal(a["weights"][k], b["weights"][k]):
            return f"weights {k}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    if sorted(sa) != sorted(sb):
        return "optimizer names"
    for n in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            if not torch.equal(sa[n][k], sb[n][k]):
                return f"{k} {n}: {float((sa[n][k] - sb[n][k]).abs().max())}"
    return ""


def _steps(make: Any, ref: Any, head: str, folder: Path, name: str) -> dict[str, Any]:
    """make(degrees) -> engine. Returns the measurements of one engine's scenario."""
    import torch.distributed as dist

    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.shard_state import read_model_state

    inputs, loss = batch(head, ref)
    kw = dict(loss=loss, epochs=1, minibatches=2)
    a = make("a")
    a.train(inputs, seed=3, **kw)
    (folder / name).mkdir(parents=True, exist_ok=True)
    files = a.save_shards(folder / name)
    dist.barrier()
    a.train(inputs, seed=4, **kw)
    uninterrupted = a.export_weights()
    full = read_model_state(folder, name)
    same = make("a")                     # the same placement, resumed
    same.load_state_dict(full)
    same.train(inputs, seed=4, **kw)
    other = make("b")                    # another placement
    other.load_state_dict(full)
    other.save_shards(folder / f"{name}-b")
    dist.barrier()
    rewritten = _state_diff(read_model_state(folder, f"{name}-b"), full)
    other.train(inputs, seed=4, **kw)
    hf = HFEngine(ref.decl, {"lr": 1e-2})
    hf.load_state_dict(full)
    hf.train(inputs, seed=4, **kw)
    return {"files": files, "version": full["version"],
            "same_exact": _max_diff(same.export_weights(), uninterrupted) == 0.0,
            "rewritten": rewritten,
            "other": _max_diff(other.export_weights(), uninterrupted),
            "hf": _max_diff(hf.export_weights(), uninterrupted)}


def worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist

    init_rank(rank, world, port)
    try:
        from graphrl.backends.engines.deepspeed_engine import DeepSpeedEngine
        from graphrl.backends.engines.hf import HFEngine
        from graphrl.backends.engines.megatron import MegatronEngine

        gpus = list(range(world))
        results = {}
        decl = tiny_decl("llama", "lm")
        placements = {"a": megatron_process_groups(rank, gpus, 1, 2, 1),
                      "b": megatron_process_groups(rank, gpus, 2, 1, 1)}

        def megatron(which: str) -> Any:
            dp, tp, zero = (1, 2, 0) if which == "a" else (2, 1, 1)
            return MegatronEngine(decl, {"lr": 1e-2}, ranks=gpus, rank=rank,
                                  groups=placements[which], dp=dp, tp=tp, pp=1, zero=zero,
                                  sequence_parallel=tp > 1)
        results["megatron"] = _steps(megatron, HFEngine(decl, {"lr": 1e-2}), "lm",
                                     Path(folder), "policy")
        vdecl = tiny_decl("gpt2", "value")
        selfs = [dist.new_group([r]) for r in gpus]
        mesh = dist.new_group(gpus)

        def deepspeed(which: str) -> Any:
            return DeepSpeedEngine(vdecl, {"lr": 1e-2}, ranks=gpus, rank=rank, group=mesh,
                                   self_group=selfs[rank], zero=2 if which == "a" else 3,
                                   micro_batches=2)
        results["deepspeed"] = _steps(deepspeed, HFEngine(vdecl, {"lr": 1e-2}), "value",
                                      Path(folder), "critic")
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def run_checkpoints(folder: str, out: str, world: int = 2, timeout_s: float = 300.0) -> dict:
    """Spawn `world` ranks; rank 0's measurements."""
    return spawn(worker, (folder, out), world, out, timeout_s, "checkpoint")
