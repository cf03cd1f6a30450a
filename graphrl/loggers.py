"""Where a run's metrics rows go: `--logger jsonl,tensorboard,wandb` (any subset; jsonl
is the default).

- jsonl: the --metrics file (DIR/metrics.jsonl with --run-dir DIR), one JSON line per
  iteration, every key of the row (graphrl.outputs.MetricsLog).
- tensorboard: event files in DIR/tensorboard (read them with TensorBoard, or its
  EventAccumulator): every numeric value of a row as a scalar at step = iteration, the
  run's configuration once as a text summary ("config") and as hparams.
- wandb: a Weights & Biases run in offline mode in DIR/wandb (nothing is sent; upload it
  later with `wandb sync DIR/wandb/offline-run-*`): the configuration as the run's
  config, every numeric value of a row at step = iteration.

Every logger has the same calls: `log_config(config)` once, `log_row(row)` per
iteration, `rewind(rows)` after a restart from a checkpoint (the rows it holds),
`close(ok)` at the end (also after an error or Ctrl-C: ok=False marks a W&B run
failed). The optional packages are imported only by the loggers that need them, and
`check_loggers` refuses a missing one before the run starts, with an install hint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from .errors import ExecutionError, UsageError

LOGGERS = ("jsonl", "tensorboard", "wandb")
DEFAULT_LOGGERS = ("jsonl",)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}   # logger -> package it needs
SUBDIRS = {"tensorboard": "tensorboard", "wandb": "wandb"}    # logger -> folder in DIR
WANDB_TIMEOUT_S = 60.0    # the longest wandb.init, run.finish or the service's shutdown
                          # may each wait on W&B's local service process


class Logger(Protocol):
    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_row(self, row: Mapping[str, Any]) -> None: ...

    def rewind(self, rows: Sequence[Mapping[str, Any]]) -> None: ...

    def close(self, ok: bool = True) -> None: ...


def parse_loggers(text: str) -> tuple[str, ...]:
    """"jsonl,tensorboard" -> ("jsonl", "tensorboard"); UsageError on an unknown name."""
    from .nearest import suggest

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError(f"--logger {text!r}: expected one or more of {', '.join(LOGGERS)}")
    for name in names:
        if name not in LOGGERS:
            raise UsageError(f"--logger {text}: unknown logger {name!r}"
                             f"{suggest(name, list(LOGGERS))} (known: {', '.join(LOGGERS)})")
    return names


def check_loggers(loggers: Sequence[str], run_dir: str | None) -> None:
    """Before the run: every logger is known, has the folder it writes in, and its
    package imports (else one line with the install hint)."""
    if isinstance(loggers, str):
        raise UsageError(f"loggers={loggers!r}: expected a tuple of names, e.g. "
                         "(\"jsonl\", \"tensorboard\")")
    if loggers:   # none at all is allowed from Python: only a --metrics file, if given
        parse_loggers(",".join(loggers))
    for name in loggers:
        if name in SUBDIRS and not run_dir:
            raise UsageError(f"--logger {name} needs --run-dir DIR (it writes into "
                             f"DIR/{SUBDIRS[name]})")
        if name in PACKAGES:
            require(PACKAGES[name], f"--logger {name}")


def require(package: str, flag: str) -> Any:
    """Import `package`, or a UsageError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or package).split(".")[0] == package:
            raise UsageError(f"{flag}: the {package} package is not installed (pip install "
                             f"{package}, or pip install 'graphrl[loggers]')") from None
        raise UsageError(f"{flag}: importing {package} failed: {e}") from None


def numeric(row: Mapping[str, Any]) -> dict[str, float]:
    """The values of a row a scalar logger records: numbers (bools as 0/1), the
    iteration (the step) aside."""
    return {k: float(v) for k, v in row.items()
            if k != "iteration" and isinstance(v, (int, float))}


class JsonlLogger:
    """The --metrics file (graphrl.outputs.MetricsLog): every key of every row."""

    def __init__(self, path: str, overwrite: bool = False):
        from .outputs import MetricsLog

        self.path = path
        self._log = MetricsLog(path, overwrite=overwrite)

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass   # the configuration is config.json beside it

    def log_row(self, row: Mapping[str, Any]) -> None:
        self._log.write(dict(row))

    def rewind(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """After a restart from a checkpoint: the file holds exactly `rows` again."""
        from .outputs import MetricsLog

        self._log.close()
        self._log = MetricsLog(self.path, overwrite=True)
        for row in rows:
            self.log_row(row)

    def close(self, ok: bool = True) -> None:
        self._log.close()


class TensorBoardLogger:
    """Event files in `folder` (torch.utils.tensorboard's writer), flushed every row."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self._writer = SummaryWriter(log_dir=str(folder))

    def log_config(self, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self._writer.add_text("config", "```\n" + text + "\n```", global_step=0)
        for summary in hparams(flat_hparams(config.get("resolved", {})), {}):
            self._writer.file_writer.add_summary(summary)
        self._writer.flush()

    def log_row(self, row: Mapping[str, Any]) -> None:
        step = row.get("iteration")
        for key, value in numeric(row).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def rewind(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """After a restart from a checkpoint: a SessionLog START at the first redone
        step, TensorBoard's own restart mark (its readers drop what was written at and
        after that step before it)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        step = int(rows[-1]["iteration"]) + 1 if rows else 0
        self._writer.file_writer.add_event(
            Event(session_log=SessionLog(status=SessionLog.START)), step=step)
        self._writer.flush()

    def close(self, ok: bool = True) -> None:
        self._writer.close()


def flat_hparams(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as TensorBoard hparams (numbers, strings and bools; others as text)."""
    out: dict[str, Any] = {}
    for key, value in sorted(options.items()):
        if value is None or value == [] or value == ():
            continue
        out[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


class WandbLogger:
    """An offline W&B run in `folder` (DIR/wandb; the run is named after DIR, grouped by
    the experiment's name): never touches the network, never captures
    the console, samples no system metrics; wandb.init and run.finish wait at most
    WANDB_TIMEOUT_S each. Closing it also shuts W&B's service process down (unless
    another W&B run of this process is active), which completes the run's file on disk
    before close() returns: read at once, it holds every row and the exit code."""

    def __init__(self, folder: Path, name: str, config: Mapping[str, Any]):
        wandb = require("wandb", "--logger wandb")
        self._wandb, self.folder = wandb, folder
        settings = wandb.Settings(mode="offline", silent=True, console="off",
                                  x_disable_stats=True, x_disable_meta=True,
                                  disable_git=True, disable_code=True, save_code=False,
                                  init_timeout=WANDB_TIMEOUT_S,
                                  finish_timeout=WANDB_TIMEOUT_S, reinit="create_new")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self._run = wandb.init(dir=str(folder.parent), project="graphrl",
                                   name=folder.parent.name or name, group=name,
                                   config=dict(config), settings=settings)
        except Exception as e:   # wandb's own errors: one line naming the logger
            raise ExecutionError(f"--logger wandb: could not start the offline W&B run "
                                 f"in {folder} ({type(e).__name__}: {e})") from None
        self._last = -1

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass   # given to wandb.init as the run's config

    def log_row(self, row: Mapping[str, Any]) -> None:
        step = row.get("iteration")
        if step is None:
            self._run.log(numeric(row), commit=True)
            return
        if step <= self._last:
            return   # W&B steps only increase: iterations redone after a restart are kept once
        # committed now: a run that stops (an error, Ctrl-C) keeps every row logged so far
        self._run.log(numeric(row), step=int(step), commit=True)
        self._last = int(step)

    def rewind(self, rows: Sequence[Mapping[str, Any]]) -> None:
        pass   # W&B steps only increase: log_row keeps the first values of a redone step

    def close(self, ok: bool = True) -> None:
        import threading

        self._run.finish(exit_code=0 if ok else 1)
        if self._wandb.run is not None:
            return   # someone else's W&B run goes on in this process
        done = threading.Thread(target=self._wandb.teardown, daemon=True)
        done.start()
        done.join(WANDB_TIMEOUT_S)
        if done.is_alive():
            raise ExecutionError(f"--logger wandb: W&B's service did not shut down within "
                                 f"{WANDB_TIMEOUT_S:.0f} s; the offline run in {self.folder} "
                                 "may lack its last rows")


class Loggers:
    """The selected loggers as one: each call goes to all of them; close() closes every
    one even when one fails (the first failure is raised after)."""

    def __init__(self, loggers: Sequence[Any]):
        self.loggers = list(loggers)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_row(self, row: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_row(row)

    def rewind(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for logger in self.loggers:
            logger.rewind(rows)

    def close(self, ok: bool = True) -> None:
        first: BaseException | None = None
        for logger in self.loggers:
            try:
                logger.close(ok)
            except Exception as e:   # noqa: BLE001 - the others still close
                first = first or e
        self.loggers = []
        if first is not None:
            raise first


def open_loggers(loggers: Sequence[str], *, metrics: str | None, run_dir: str | None,
                 name: str, config: Mapping[str, Any] | None,
                 overwrite: bool = False) -> Loggers:
    """The metrics file (when given) and the other loggers `loggers` names, each given
    `config` once. A logger that fails to open closes the ones opened before it."""
    out = Loggers([])
    try:
        if metrics:   # --metrics FILE, or DIR/metrics.jsonl with jsonl among the loggers
            out.loggers.append(JsonlLogger(metrics, overwrite=overwrite))
        for logger in loggers:
            if logger == "tensorboard":
                out.loggers.append(TensorBoardLogger(Path(run_dir or ".") / SUBDIRS[logger]))
            elif logger == "wandb":
                out.loggers.append(WandbLogger(Path(run_dir or ".") / SUBDIRS[logger], name,
                                               config or {}))
        if config is not None:
            out.log_config(config)
    except BaseException:
        try:
            out.close(ok=False)
        except Exception:   # noqa: BLE001 - the error that stopped the opening is reported
            pass
        raise
    return out


__all__ = ["LOGGERS", "DEFAULT_LOGGERS", "Logger", "parse_loggers", "check_loggers",
           "require", "numeric", "JsonlLogger", "TensorBoardLogger", "WandbLogger",
           "Loggers", "open_loggers"]
