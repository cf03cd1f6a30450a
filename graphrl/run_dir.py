"""`--run-dir DIR`: one folder that holds a whole run and reproduces it.

    DIR/config.json      every option, the example, model and data hashes, versions, the plan
    DIR/metrics.jsonl    the metrics rows (--logger jsonl; --metrics FILE elsewhere)
    DIR/trace.json       the measured timeline (--trace FILE elsewhere)
    DIR/checkpoints/     checkpoints, one at the end (--checkpoint-dir elsewhere)
    DIR/save/            the trained models as Hugging Face directories (--save elsewhere)
    DIR/tensorboard/     --logger tensorboard;   DIR/wandb/  --logger wandb (offline)

An option given explicitly wins over its place in DIR. A DIR that already holds a run
(its config.json) is refused unless --overwrite (the earlier run's checkpoints and logger
folders are removed; its other files are replaced as the new run writes them) or
--resume (the run continues there). `graphrl run --config DIR/config.json` reruns it
(graphrl.run_record).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import UsageError
from .run_record import CONFIG_FILE

if TYPE_CHECKING:
    from .experiment import RunOptions

METRICS_FILE = "metrics.jsonl"
TRACE_FILE = "trace.json"
CHECKPOINTS = "checkpoints"
SAVE = "save"
LOGGER_DIRS = ("tensorboard", "wandb")


def resolve(opts: RunOptions, trains: bool) -> RunOptions:
    """`opts` with the run directory's places filled in where not given (`trains`: some
    model of the run trains, so there is something to save)."""
    if not opts.run_dir:
        return opts
    d = Path(opts.run_dir)
    return dataclasses.replace(
        opts,
        metrics=opts.metrics or (str(d / METRICS_FILE) if "jsonl" in opts.loggers else None),
        trace=opts.trace or str(d / TRACE_FILE),
        checkpoint_dir=opts.checkpoint_dir or str(d / CHECKPOINTS),
        save=opts.save or (str(d / SAVE) if trains else None))


def holds_run(run_dir: str) -> bool:
    return (Path(run_dir) / CONFIG_FILE).is_file()


def prepare(given: RunOptions, resolved: RunOptions) -> None:
    """Create DIR, or refuse one that holds a run unless --overwrite (the earlier run's
    checkpoints and logger folders are removed) or --resume (its logger folders are
    removed: the resumed run logs every row again from the start)."""
    from .outputs import check_output_dir

    run_dir = given.run_dir
    if not run_dir:
        return
    check_output_dir("--run-dir", run_dir)
    if not holds_run(run_dir):
        return
    if not (given.overwrite or given.resume):
        raise UsageError(f"--run-dir {run_dir}: holds a run already ({CONFIG_FILE}); choose "
                         "another --run-dir, --resume it, or --overwrite to replace it")
    # a resumed run logs every row again from its start: its logger folders are new
    d = Path(run_dir)
    old = [d / name for name in LOGGER_DIRS]
    if not given.resume and not given.checkpoint_dir:
        old.append(d / CHECKPOINTS)
    for path in old:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def write_config(run_dir: str, record: Mapping[str, Any]) -> Path:
    from .outputs import atomic_write_text

    path = Path(run_dir) / CONFIG_FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


__all__ = ["resolve", "prepare", "holds_run", "write_config",
           "METRICS_FILE", "TRACE_FILE", "CHECKPOINTS", "SAVE", "LOGGER_DIRS"]
