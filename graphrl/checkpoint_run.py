"""The run loop's side of checkpoints: what a checkpoint of a run holds besides the
executor's state, when to write one, and how a run resumes from one.

A run's future depends on: the models' weights, optimizer state and versions (the
executor writes them: `save_state` / `load_state`), the RNG states of the driver process
(and of each rank on Ray), the data position (Experiment.data is a function of the
iteration and the seed, so the position is the iteration; a fingerprint of the next
iteration's inputs proves the data is the same), the metrics rows so far and the
result of Experiment.prepare (not re-run on resume: its effect is in the weights).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from .checkpoint import (RUN_FILE, Checkpoint, CheckpointWriter, file_written,
                         find_checkpoint, fingerprint, load_torch, payload_fingerprint,
                         rng_state, save_torch, set_rng_state)
from .errors import UsageError

DRIVER_RNG = "rng/driver.pt"


def graph_body(graph: Any) -> str:
    """The step's graph text without its model lines and weight sizes (models are
    compared by their parameter shapes, which name the parameter that differs)."""
    return "\n".join(re.sub(r", bytes=\d+\]", "]", line) for line in graph.text().splitlines()
                     if not line.strip().startswith("model "))


@dataclass
class Resumed:
    """What a run continues from: the first iteration to run, the metrics rows so far,
    the prepare() metrics and the checkpoint itself."""

    start: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    prepared: dict[str, float] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None


def open_resume(opts: Any, exp: Any, program: Any) -> Checkpoint | None:
    """--resume: find and verify the checkpoint, check the step's graph, the seed and
    the data position against this run before any executor starts."""
    if not opts.resume:
        return None
    ck = find_checkpoint(opts.resume)
    m, where = ck.manifest, f"checkpoint {ck.path}"
    body = graph_body(program.graph)
    if m.get("graph") != fingerprint(body):
        theirs = str(m.get("graph_text", "")).splitlines()
        ours = body.splitlines()
        diff = next((f"checkpoint: {a!r}, this run: {b!r}" for a, b in zip(theirs, ours)
                     if a != b), f"{len(theirs)} vs {len(ours)} lines")
        raise UsageError(f"{where}: written by another step (@{m.get('step')}, this run "
                         f"@{program.graph.name}); first difference: {diff}")
    if m.get("seed") != opts.seed:
        raise UsageError(f"{where}: written with --seed {m.get('seed')}, this run has "
                         f"--seed {opts.seed} (exact resume needs the same seed)")
    state = ck.run_state()
    iterations = opts.iterations or exp.iterations
    if ck.iteration > iterations:
        raise UsageError(f"{where}: already {ck.iteration} iterations, more than the "
                         f"{iterations} this run asks for (--iterations)")
    if ck.iteration < iterations:   # async runs (--staleness K) are K steps ahead
        now = payload_fingerprint(exp.data(ck.iteration + opts.staleness))
        if now != state["data"]["next_inputs"]:
            raise UsageError(f"{where} ({RUN_FILE}): the inputs of iteration {ck.iteration} "
                             f"differ from the checkpointed run's (fingerprint {now}, "
                             f"checkpoint {state['data']['next_inputs']}): another --data "
                             "file, --batch-size or prompt length?")
    return ck


def restore(ck: Checkpoint, executor: Any) -> Resumed:
    """Check the models' shapes, then load the executor's and the driver's state."""
    ck.check_matches({"graph": ck.manifest["graph"], "step": ck.manifest.get("step"),
                      "seed": ck.manifest["seed"], "models": executor.model_shapes()})
    state = ck.run_state()
    executor.load_state(ck)
    set_rng_state(load_torch(ck.file(DRIVER_RNG)))
    return Resumed(ck.iteration, list(state["rows"]), dict(state["prepared"]), ck)


def write_checkpoint(writer: CheckpointWriter, executor: Any, exp: Any, program: Any,
                     opts: Any, done: int, rows: list[dict[str, Any]],
                     prepared: Mapping[str, float], total: int,
                     next_step: int | None = None) -> tuple[Any, float]:
    """Checkpoint after `done` iterations (`next_step`: the step the run takes next,
    `done` + K for an async run); returns (its path, seconds it took)."""
    next_step = done if next_step is None else next_step
    t0 = time.perf_counter()
    tmp = writer.begin(done)
    rng = rng_state()   # before anything below could draw from an RNG
    placement = executor.save_state(tmp)
    save_torch(rng, tmp / DRIVER_RNG)
    nxt = payload_fingerprint(exp.data(next_step)) if done < total else None
    run = {"iteration": done, "seed": opts.seed, "rows": rows, "prepared": dict(prepared),
           "data": {"next_iteration": next_step, "seed": opts.seed, "next_inputs": nxt}}
    (tmp / RUN_FILE).write_text(json.dumps(run), encoding="utf-8")
    file_written(tmp / RUN_FILE)
    body = graph_body(program.graph)
    path = writer.publish(tmp, done, {
        "step": program.graph.name, "graph": fingerprint(body), "graph_text": body,
        "seed": opts.seed, "models": executor.model_shapes(), "placement": placement})
    set_rng_state(rng)   # writing a checkpoint never changes what the run draws next
    return path, time.perf_counter() - t0


def due(opts: Any, done: int, total: int) -> bool:
    """Write a checkpoint after `done` iterations: every --checkpoint-every, and at the
    end of the run."""
    every = opts.checkpoint_every or 0
    return bool(opts.checkpoint_dir) and (done == total or (every > 0 and done % every == 0))


__all__ = ["Resumed", "open_resume", "restore", "write_checkpoint", "due", "graph_body"]
