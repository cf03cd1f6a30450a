"""The run loop's side of checkpoints: what a checkpoint of a run holds besides the
executor's state, when to write one, and how a run resumes from one.

A run's future depends on: the models' weights, optimizer state and versions (the
executor writes them: `save_state` / `load_state`), the RNG states of the driver process
(and of each rank on Ray), the data position (Experiment.data is a function of the
iteration and the seed, so the position is the iteration; a fingerprint of the next
iteration's inputs proves the data is the same), the metrics rows so far and the
result of Experiment.prepare (not re-run on resume: its effect is in the weights).
Every checkpoint, the last of a finished run included, records the next step and its
inputs' fingerprint, and the run's settings (graphrl.run_identity) but not the number of
iterations asked for: resuming with a larger --iterations extends a finished run.
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
from .run_identity import DECISIVE, EXPLAINING, differences, run_settings

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
    """--resume: find and verify the checkpoint (every file's sha256 first: a corrupt
    checkpoint is reported as corrupt), then check this run's settings, step graph and
    next inputs against it before any executor starts (graphrl.run_identity). The
    iteration count may differ: a finished run resumed with more iterations continues."""
    if not opts.resume:
        return None
    ck = find_checkpoint(opts.resume)
    m, where = ck.manifest, f"checkpoint {ck.path}"
    state = ck.run_state()
    theirs, ours = state.get("settings", {}), run_settings(opts, program)
    explain = differences(theirs, ours, EXPLAINING)
    refused = differences(theirs, ours, DECISIVE)
    if refused:
        raise UsageError(_refusal(where, refused + explain))
    body = graph_body(program.graph)
    if m.get("graph") != fingerprint(body):
        if explain:
            raise UsageError(_refusal(where, explain))
        theirs_text = str(m.get("graph_text", "")).splitlines()
        ours_text = body.splitlines()
        diff = next((f"checkpoint: {a!r}, this run: {b!r}" for a, b in
                     zip(theirs_text, ours_text) if a != b),
                    f"{len(theirs_text)} vs {len(ours_text)} lines")
        raise UsageError(f"{where}: written by another step (@{m.get('step')}, this run "
                         f"@{program.graph.name}); first difference: {diff}")
    if m.get("seed") != opts.seed:   # checkpoints written before run.json had settings
        raise UsageError(_refusal(where, [f"--seed: checkpoint {m.get('seed')}, "
                                          f"this run {opts.seed}"]))
    if ck.iteration < (opts.iterations or exp.iterations):
        check_next_inputs(ck, exp, opts, state, explain)
    return ck


def _refusal(where: str, differ: list[str]) -> str:
    return (f"{where}: this run's settings differ from the checkpointed run's: "
            + "; ".join(differ) + " (a resumed run keeps them; --iterations, the backend "
            "and the output files may change)")


def check_next_inputs(ck: Checkpoint, exp: Any, opts: Any, state: Mapping[str, Any],
                      explain: list[str]) -> None:
    """The inputs of the next step (async runs, --staleness K: K steps ahead) are the
    ones the checkpointed run would have read."""
    where = f"checkpoint {ck.path} ({RUN_FILE})"
    recorded = state["data"].get("next_inputs")
    if recorded is None:
        raise UsageError(f"{where}: the last checkpoint of a finished run written by an "
                         "older graphrl records no fingerprint of the next inputs, so it "
                         "cannot be extended (resume it with the --iterations it ran, or "
                         "start from an earlier checkpoint)")
    now = payload_fingerprint(exp.data(ck.iteration + opts.staleness))
    if now != recorded:
        if explain:
            raise UsageError(_refusal(where, explain))
        raise UsageError(f"{where}: the inputs of iteration {ck.iteration} differ from the "
                         f"checkpointed run's (fingerprint {now}, checkpoint {recorded}): "
                         "the --data file's rows or the tokenizer changed?")


def nothing_left(ck: Checkpoint, iterations: int, opts: Any) -> str:
    """The one line for a resume with nothing to run (the checkpoint has `iterations` or
    more); --save needs a run, so it is refused here."""
    line = (f"nothing to run: checkpoint {ck.path} already has {ck.iteration} iterations "
            f"and this run asks for {iterations} (--iterations); give more to extend it")
    if opts.save:
        raise UsageError(f"--save {opts.save}: {line}")
    return line


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
                     prepared: Mapping[str, float], settings: Mapping[str, Any],
                     next_step: int | None = None) -> tuple[Any, float]:
    """Checkpoint after `done` iterations (`next_step`: the step the run takes next,
    `done` + K for an async run; `settings`: run_identity.run_settings); returns (its
    path, seconds it took). It records the next step's position and inputs also at the
    end of a run, which is how a finished run can be extended."""
    next_step = done if next_step is None else next_step
    t0 = time.perf_counter()
    tmp = writer.begin(done)
    rng = rng_state()   # before anything below could draw from an RNG
    placement = executor.save_state(tmp)
    save_torch(rng, tmp / DRIVER_RNG)
    nxt = payload_fingerprint(exp.data(next_step))
    run = {"iteration": done, "seed": opts.seed, "rows": rows, "prepared": dict(prepared),
           "settings": dict(settings),
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


__all__ = ["Resumed", "open_resume", "restore", "write_checkpoint", "due", "graph_body",
           "nothing_left", "check_next_inputs"]
