"""Run an Experiment for N iterations on a backend: progress bar, metrics, trace, summary."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .errors import ExecutionError, UsageError
from .evaluation import OUTPUTS as EVAL_OUTPUTS
from .evaluation import check_evaluates, eval_metrics, eval_summary
from .experiment import Experiment, RunOptions
from .finite import check_finite
from .timeline import Event, call_seconds, write_chrome_trace


@dataclass(frozen=True)
class RunSummary:
    rows: tuple[dict[str, Any], ...]
    events: tuple[Event, ...]
    prepare: dict[str, float]
    seconds: float
    resumed: int = 0   # of the rows, how many came from a checkpoint (--resume)

    def reward_window(self, first: bool, k: int = 5) -> float:
        rows = self.rows[:k] if first else self.rows[-k:]
        return sum(r["reward_mean"] for r in rows) / len(rows)


def metrics_row(iteration: int, outputs: dict[str, Any], reward: str, seconds: float,
                events: tuple[Event, ...], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """One iteration's metrics; outputs named in `skip` (an evaluation's) are left out."""
    row: dict[str, Any] = {"iteration": iteration,
                           "reward_mean": float(outputs[reward]["score"].double().mean()),
                           "step_seconds": round(seconds, 6)}
    for call, s in sorted(call_seconds(events).items()):
        row[f"seconds/{call}"] = round(s, 6)
    for name, payload in sorted(outputs.items()):
        if name == reward or name in skip:
            continue
        if {"tokens", "attention_mask", "response_mask"} <= set(payload):
            row.update(token_counts(payload))
            continue
        for f, t in sorted(payload.items()):
            if t.numel() == 1:
                row[f"{name}/{f}"] = float(t)
            elif t.dtype.is_floating_point or f == "version":
                row[f"{name}/{f}_mean"] = float(t.double().mean())
    return row


def token_counts(rollout: dict[str, Any]) -> dict[str, float]:
    """Token accounting of a Rollout: prompt, response and padding tokens, and response
    lengths (a response ends at its stop token)."""
    real, response = rollout["attention_mask"], rollout["response_mask"]
    lengths = response.sum(dim=1)
    return {"tokens/prompt": float(real.sum() - response.sum()),
            "tokens/response": float(response.sum()),
            "tokens/padding": float(real.numel() - real.sum()),
            "response_length_mean": float(lengths.mean()),
            "response_length_max": float(lengths.max())}


def check_save_target(path: str, overwrite: bool = False, flag: str = "--save") -> None:
    """--save (or `flag`) must be creatable: not a file, not an earlier output (unless
    overwrite), its parent a directory we can write in."""
    from .outputs import why_not_writable

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {path}: is a file")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {path}: the directory holds an earlier output; choose "
                         "another name or pass --overwrite")
    why = why_not_writable(target.resolve().parent)
    if why:
        raise UsageError(f"{flag} {path}: {why}")


def trained_engine(executor: Any, name: str) -> Any:
    """An engine in this process holding model `name`'s trained weights: the local
    backend's own, or a copy the Ray driver builds from the workers' (driver_engine)."""
    copy = getattr(executor, "driver_engine", None)
    return copy(name) if copy is not None else executor.engines[name]


def save_run(program: Any, executor: Any, target: str) -> list[str]:
    """Write the run's trained models as Hugging Face directories (graphrl.backends)."""
    from graphrl.backends.engines.hf_checkpoint import save_trained
    from graphrl.hf_dir import TOKENIZER_FILES

    policy = next((m for m in program.models.values() if m.trainable and m.head == "lm"), None)
    if policy is not None and policy.lora is not None:   # a PEFT adapter directory
        from graphrl.backends.engines.lora_hf import save_adapter

        return save_adapter(target, trained_engine(executor, policy.name),
                            policy.checkpoint, program.models, executor.export_weights)
    source = policy.checkpoint if policy is not None else None
    if source is not None and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        source = None
    return save_trained(target, program.models, executor.export_weights, source)


def make_executor(program: Any, opts: RunOptions, out: TextIO = sys.stdout) -> Any:
    """The executor `opts.backend` names, for `program` (see graphrl.backends.base).
    Every model's precision is checked against the device first (bf16 where the device
    cannot compute it is refused before anything is built)."""
    from graphrl.backends.engines.precision import check_precisions

    check_precisions((m.decl() for m in program.models.values()), opts.device)
    if opts.backend == "local":
        from graphrl.backends.local import LocalExecutor

        return LocalExecutor(program, device=opts.device, seed=opts.seed)
    if opts.backend == "ray":
        from .launch import start_executor

        return start_executor(program, opts, out=None if opts.quiet else out)
    raise UsageError(f"unknown backend {opts.backend!r} (known: local, ray)")


def run_experiment(exp: Experiment, opts: RunOptions, out: TextIO = sys.stdout,
                   executor: Any = None, source: str | None = None) -> RunSummary:
    """Run `exp` for its iterations on `executor` (default: a new one of `opts.backend`,
    closed at the end — also on errors and Ctrl-C; one passed in stays open).
    --checkpoint-dir/--checkpoint-every/--keep write checkpoints (graphrl.checkpoint),
    --resume continues from one, --max-restarts restarts the executor from the last
    checkpoint when a worker dies. --run-dir holds the whole run (graphrl.run_dir; its
    config.json records `source`, the example file); every metrics row goes to the
    --logger loggers (graphrl.loggers)."""
    from tqdm import tqdm

    from . import checkpoint_run as ckr
    from .run_identity import run_settings

    if opts.model_size:
        raise UsageError(f"--model-size {opts.model_size} plans full-size models for graphrl "
                         "compile/compare; they are not run here (run the examples at their "
                         "own size, or give small configs with --model-config ROLE=FILE)")
    from . import run_dir
    from .loggers import check_loggers
    from .outputs import check_output_file, writing

    start = time.perf_counter()
    iterations = opts.iterations or exp.iterations
    exp.check_roles(opts)
    check_evaluates(exp, opts)
    exp = exp.with_precision(opts)
    given, opts = opts, run_dir.resolve(opts, trains=any(m.trainable for m in exp.models))
    check_loggers(opts.loggers, opts.run_dir)
    check_checkpoint_options(opts)
    program = exp.program(opts.staleness)
    ckpt = ckr.open_resume(opts, exp, program)   # verified before anything is loaded
    if ckpt is not None and ckpt.iteration >= iterations:   # a finished run, not extended
        print(f"[{exp.name}] " + ckr.nothing_left(ckpt, iterations, given), file=out)
        state = ckpt.run_state()   # (before --run-dir is prepared: nothing is touched)
        return RunSummary(tuple(state["rows"]), (), dict(state["prepared"]),
                          time.perf_counter() - start, len(state["rows"]))
    run_dir.prepare(given, opts)
    if opts.save:
        from .lora import check_save_target as check_lora_save

        check_save_target(opts.save, opts.overwrite)
        check_lora_save(opts.save, exp.models)
    if opts.save_merged:
        check_save_target(opts.save_merged, opts.overwrite, "--save-merged")
        if not any(m.lora is not None and m.trainable for m in exp.models):
            raise UsageError(f"--save-merged {opts.save_merged}: no model of {exp.name} "
                             "trains LoRA adapters (--lora ROLE); use --save")
    if opts.trace:  # before any work: a long run must not die at the end on its trace path
        check_output_file("--trace", opts.trace)
    if opts.metrics:
        check_output_file("--metrics", opts.metrics, overwrite=opts.overwrite or bool(ckpt))
    record = None
    if opts.run_dir:
        from .run_record import run_record

        record = run_record(exp, program, given, opts, iterations, source)
        run_dir.write_config(opts.run_dir, record)
    settings = run_settings(opts, program) if opts.checkpoint_dir else {}
    writer = None
    if opts.checkpoint_dir:
        from .checkpoint import CheckpointWriter

        writer = CheckpointWriter(opts.checkpoint_dir, opts.keep)
        if writer.removed and not opts.quiet:
            print(f"[{exp.name}] removed half-written checkpoints: "
                  + ", ".join(writer.removed), file=out)
    owned = executor is None
    log = None
    prepared: dict[str, float] = {}
    finished = False
    bar = None
    rows: list[dict[str, Any]] = []
    events: list[Event] = []
    extra: list[str] = []
    restarts = 0
    resumed_rows = 0
    saved_s: list[float] = []   # seconds each checkpoint took
    try:
        if executor is None:
            executor = make_executor(program, opts, out)
        if (writer or ckpt) and hasattr(executor, "check_checkpointable"):
            executor.check_checkpointable()
        log = open_run_loggers(exp.name, opts, executor, record, overwrite=bool(ckpt))
        if ckpt is not None:
            resumed = ckr.restore(ckpt, executor)
            rows, prepared = resumed.rows, resumed.prepared
            resumed_rows = len(rows)
            print(f"[{exp.name}] resumed from {ckpt.path} after {resumed.start} "
                  "iterations", file=out)
        else:
            prepared = executor.prepare(exp.prepare) if exp.prepare else {}
        if prepared and not opts.quiet:
            print(f"[{exp.name}] before RL: " + ", ".join(f"{k}={v:.3f}" for k, v in
                                                          prepared.items()), file=out)
        if exp.evaluation is not None and not opts.quiet:
            ev = exp.evaluation
            print(f"[{exp.name}] evaluating every {ev.options.every} steps on "
                  f"{ev.source or 'held-out prompts'}, {ev.options.samples} sample(s) each"
                  + (" and greedy" if ev.options.greedy else ""), file=out)
        for row in rows:
            log.log_row(row)
        bar = tqdm(total=iterations, initial=len(rows), desc=exp.name, unit="it",
                   disable=opts.quiet, dynamic_ncols=True, file=sys.stderr)
        # steps: async runs (--staleness K) first run K generate-only warm-up steps
        i, steps = len(rows) + (opts.staleness if rows else 0), iterations + opts.staleness
        while i < steps:
            try:
                ahead = ({"upcoming": exp.data(i + 1)} if opts.staleness and i + 1 < steps
                         and getattr(executor, "streams_ahead", False) else {})
                result = executor.run_step(exp.step_inputs(i), iteration=i, **ahead)
            except ExecutionError as e:
                lost = lost_ranks(e, executor) if opts.max_restarts and owned else []
                if not lost:
                    raise
                if restarts >= opts.max_restarts:
                    raise ExecutionError(
                        f"{e}\n(rank(s) {', '.join(map(str, lost))} died at iteration {i}; "
                        f"gave up after {restarts} restart(s), --max-restarts "
                        f"{opts.max_restarts})") from e
                restarts += 1
                executor, i = restart_from_checkpoint(
                    e, lost, executor, program, opts, out, exp.name, i, restarts)
                rows = rows[:i]
                log.rewind(rows)
                bar.n = i
                continue
            if getattr(result, "warmup", False):
                i += 1
                continue
            evaluates = exp.evaluation is not None
            row = metrics_row(i, result.outputs, exp.reward, result.seconds, result.events,
                              EVAL_OUTPUTS if evaluates else ())
            check_finite(row, i, program.graph, exp.reward)
            if evaluates and "eval_scores" in result.outputs:   # graphrl.evaluation
                row.update(eval_metrics(result.outputs, exp.evaluation.options))
            rows.append(row)
            events.extend(result.events)
            log.log_row(row)
            i += 1
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", s=f"{result.seconds:.2f}")
            if writer is not None and ckr.due(opts, len(rows), iterations):
                with writing("--checkpoint-dir", opts.checkpoint_dir):
                    path, secs = ckr.write_checkpoint(writer, executor, exp, program, opts,
                                                      len(rows), rows, prepared, settings,
                                                      next_step=i)
                saved_s.append(secs)
        report = getattr(executor, "summary_lines", None)
        if report is not None:
            extra = list(report(events, len(rows)))
        if saved_s:
            extra.append(f"  checkpoints: {len(saved_s)} written to {opts.checkpoint_dir}, "
                         f"{sum(saved_s) / len(saved_s):.3f} s each")
        if opts.save:
            with writing("--save", opts.save):
                saved = save_run(program, executor, opts.save)
            extra.append("  saved: " + ", ".join(saved))
        if opts.save_merged:
            from graphrl.backends.engines.lora_hf import save_merged

            with writing("--save-merged", opts.save_merged):
                lora = next(m.name for m in program.models.values()
                            if m.lora is not None and m.trainable)
                merged = save_merged(opts.save_merged, program.models,
                                     {lora: trained_engine(executor, lora)})
            extra.append("  saved merged: " + merged)
        finished = True
    finally:
        if bar is not None:
            bar.close()
        if owned and executor is not None:
            executor.close()
        if opts.trace:  # also when the run failed or was interrupted: what was measured
            try:
                with writing("--trace", opts.trace):
                    write_chrome_trace(opts.trace, events, source="measured")
            except UsageError as e:
                if finished:
                    raise
                print(f"[{exp.name}] {e}", file=out)   # the run's own error is reported
        if log is not None:
            close_loggers(log, finished, exp.name, out)
        if not finished and rows:
            partial = RunSummary(tuple(rows), tuple(events), prepared,
                                 time.perf_counter() - start, resumed_rows)
            print(f"[{exp.name}] stopped early; the completed iterations:\n"
                  + format_summary(exp.name, partial, opts), file=out)
    summary = RunSummary(tuple(rows), tuple(events), prepared, time.perf_counter() - start,
                         resumed_rows)
    print("\n".join([format_summary(exp.name, summary, opts)] + extra), file=out)
    return summary


def open_run_loggers(name: str, opts: RunOptions, executor: Any, record: Any,
                     overwrite: bool) -> Any:
    """The --logger loggers, given the run's configuration (config.json, now with the
    plan the executor runs, written again) once."""
    from .loggers import open_loggers

    if record is not None:
        from .run_dir import write_config
        from .run_record import plan_summary

        record["plan"] = plan_summary(executor, opts)
        write_config(opts.run_dir, record)
    return open_loggers(opts.loggers, metrics=opts.metrics, run_dir=opts.run_dir, name=name,
                        config=record, overwrite=opts.overwrite or overwrite)


def close_loggers(log: Any, finished: bool, name: str, out: TextIO) -> None:
    """Close the loggers (ok=False after an error or Ctrl-C: a W&B run is marked
    failed); a failure to close is raised after a finished run, reported after a failed
    one (whose own error goes on)."""
    try:
        log.close(ok=finished)
    except Exception as e:
        if finished:
            raise
        print(f"[{name}] closing the loggers failed too: {type(e).__name__}: {e}", file=out)


def check_checkpoint_options(opts: RunOptions) -> None:
    if opts.checkpoint_every and not opts.checkpoint_dir:
        raise UsageError("--checkpoint-every needs --checkpoint-dir DIR")
    if opts.keep < 1:
        raise UsageError(f"--keep {opts.keep}: keep at least 1 checkpoint")
    if opts.max_restarts < 0:
        raise UsageError(f"--max-restarts {opts.max_restarts}: expected 0 or more")
    if opts.max_restarts and not opts.checkpoint_dir:
        raise UsageError("--max-restarts needs --checkpoint-dir DIR (a restarted run "
                         "continues from the last checkpoint)")


def lost_ranks(e: ExecutionError, executor: Any) -> list[int]:
    """The ranks whose worker process died (an error in the step itself would fail the
    same way again after a restart: it is not retried)."""
    lost = list(getattr(e, "lost", None) or [])
    probe = getattr(executor, "lost_ranks", None)
    if probe is not None:
        lost = sorted(set(lost) | set(probe()))
    return lost


def restart_from_checkpoint(e: ExecutionError, lost: list[int], executor: Any,
                            program: Any, opts: RunOptions, out: TextIO, name: str,
                            failed: int, restarts: int) -> tuple[Any, int]:
    """Close the failed executor (every rank stops), start a new one and load the last
    published checkpoint; returns (executor, the iteration to continue at)."""
    from . import checkpoint_run as ckr
    from .checkpoint import find_checkpoint, published

    executor.close()
    where = (f"rank(s) {', '.join(map(str, lost))} died; the error came from "
             f"{getattr(e, 'method', '?')} on rank {getattr(e, 'rank', '?')}")
    if not published(Path(opts.checkpoint_dir)):
        raise ExecutionError(f"{e}\n(no checkpoint to restart from yet)") from e
    ck = find_checkpoint(opts.checkpoint_dir)
    print(f"[{name}] worker lost at iteration {failed} ({where}): "
          f"{str(e).splitlines()[0]}; restart {restarts}/{opts.max_restarts} from "
          f"{ck.path} ({failed - ck.iteration} iteration(s) lost)", file=out)
    executor = make_executor(program, opts, out)
    ckr.restore(ck, executor)
    return executor, ck.iteration


def run(exp: Experiment, **options: Any) -> RunSummary:
    """Run `exp` from Python: options as on the command line (iterations, seed, metrics,
    trace, device, backend, save, run_dir, loggers, ...), e.g. run(exp, iterations=100,
    save="out/") or run(exp, run_dir="runs/a", loggers=("jsonl", "tensorboard"))."""
    from dataclasses import fields

    from .option_checks import unknown_options

    unknown_options(options, [f.name for f in fields(RunOptions)])
    return run_experiment(exp, RunOptions(**options))


def format_summary(name: str, s: RunSummary, opts: RunOptions) -> str:
    k = min(5, len(s.rows))
    step_s = sum(r["step_seconds"] for r in s.rows) / len(s.rows)
    ran = (f"{len(s.rows)} iterations in {s.seconds:.1f} s" if not s.resumed else
           f"{len(s.rows)} iterations ({s.resumed} from the checkpoint, "
           f"{len(s.rows) - s.resumed} run in {s.seconds:.1f} s)")
    lines = [f"[{name}] {ran} ({step_s:.3f} s per step)",
             f"  reward_mean  first {k}: {s.reward_window(True, k):.3f}   "
             f"last {k}: {s.reward_window(False, k):.3f}   "
             f"change: {s.reward_window(False, k) - s.reward_window(True, k):+.3f}",
             *eval_summary(s.rows),
             "  seconds per call (total):"]
    for call, sec in sorted(call_seconds(s.events).items(), key=lambda kv: -kv[1]):
        lines.append(f"    {call:<24} {sec:8.3f}")
    for what, path in (("metrics", opts.metrics), ("trace", opts.trace)):
        if path:
            lines.append(f"  {what}: {Path(path)}")
    if opts.run_dir:
        lines.append(f"  run dir: {Path(opts.run_dir)} (rerun: graphrl run --config "
                     f"{Path(opts.run_dir) / 'config.json'})")
    return "\n".join(lines)
