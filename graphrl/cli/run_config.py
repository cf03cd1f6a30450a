"""`graphrl run --config DIR/config.json [EXAMPLE.py] [options]`: rerun a recorded run.

The run's options are the ones its config.json recorded (graphrl.run_record); an
option given on the command line beside --config replaces the recorded one (said in
one line). Not carried over: --overwrite and --resume (a rerun starts from scratch and
replaces nothing unless told). Before anything runs, the example file, each model's
config.json and every input file must hash as recorded, else one line names the file
(an input replaced on the command line is not compared). After the run, its rows are
compared with the recorded run's metrics file, timings aside.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from ..errors import UsageError
from ..experiment import RunOptions

# options that name the run's inputs -> the part of the record they replace
INPUT_OPTIONS = {"data": "data", "reward": "reward", "loss": "loss",
                 "model_config": "model_config",
                 "placement": "placement", "model_dirs": "models"}
NOT_CARRIED = ("overwrite", "resume")


def recorded_options(record: Mapping[str, Any], where: str) -> RunOptions:
    """The RunOptions a config.json's "options" hold."""
    options = record.get("options")
    if not isinstance(options, dict):
        raise UsageError(f"{where}: no \"options\" object (not a graphrl run's config.json)")
    names = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"{where}: unknown option(s) {', '.join(unknown)} (written by "
                         "another graphrl version?)")
    hints = typing.get_type_hints(RunOptions)
    values = {}
    for key, value in options.items():
        if key in ("model_dirs", "model_config") and isinstance(value, list) and all(
                isinstance(v, list) and len(v) == 2 for v in value):
            value = tuple((str(r), str(p)) for r, p in value)
        elif isinstance(value, list):
            value = tuple(value)
        if not _has_type(value, hints[key]):
            raise UsageError(f"{where}: option {key} is {value!r}, expected "
                             f"{_type_name(hints[key])}")
        values[key] = value
    return RunOptions(**values)


def _has_type(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple)
    if hint in (int, float):   # a JSON number; never a bool
        return isinstance(value, (int, float) if hint is float else int) and \
            not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The options (their dests) that `argv` gives explicitly, defaults aside."""
    unset = object()
    dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
    ns = argparse.Namespace(**{d: unset for d in dests})
    for a in parser._actions:
        if isinstance(a.default, list):
            setattr(ns, a.dest, [])
    parser.parse_args(list(argv), namespace=ns)
    return {d for d in dests if getattr(ns, d) is not unset and getattr(ns, d) != []}


def flag(dest: str) -> str:
    named = {"model_dirs": "--model", "loggers": "--logger"}
    return named.get(dest, "--" + dest.replace("_", "-"))


def rerun(ns: argparse.Namespace, given: set[str], out: TextIO | None = None) -> int:
    from ..example_file import load_example
    from ..run_record import (check_example, check_inputs, compare_rows, inputs_record,
                              load_record)
    from ..runner import run_experiment
    from .run_args import run_options

    out = out or sys.stdout
    where = f"--config {ns.config}"
    record = load_record(ns.config)
    recorded = recorded_options(record, where)
    example = ns.example or (record.get("example") or {}).get("path")
    if not example:
        raise UsageError(f"{where}: records no example file (a run started from Python); "
                         "name it: graphrl run EXAMPLE.py --config ...")
    if not ns.example or Path(ns.example).resolve() == Path(example).resolve():
        check_example(record, example, where)
    given = {d for d in given if d not in ("example", "config", "help")}
    if "backend" not in given:
        ns.backend = recorded.backend   # the Ray options given belong to the recorded backend
    cli = run_options(ns)
    fields = {f.name for f in dataclasses.fields(RunOptions)}
    overrides = {d: getattr(cli, d) for d in sorted(given & fields)}
    fresh = {k: getattr(RunOptions(), k) for k in NOT_CARRIED}
    opts = dataclasses.replace(recorded, **{**fresh, **overrides},
                               config=str(Path(ns.config).absolute()))
    changed = [f"{flag(d)} {_shown(getattr(opts, d))} "
               f"(recorded {_shown(getattr(recorded, d))})" for d in sorted(overrides)
               if d not in NOT_CARRIED and getattr(opts, d) != getattr(recorded, d)]
    print(f"graphrl run: rerunning {example} as recorded in {ns.config}"
          + (f"; from the command line: {', '.join(changed)}" if changed else ""), file=out)
    build = load_example(example)
    exp = build(opts)
    skip = frozenset(INPUT_OPTIONS[d] for d in given if d in INPUT_OPTIONS)
    check_inputs(record, inputs_record(exp, exp.program(opts.staleness), opts), where, skip)
    old_metrics = (record.get("resolved") or {}).get("metrics")
    old_rows = recorded_rows(old_metrics) if old_metrics else None   # before a rerun
    summary = run_experiment(exp, opts, out=out, source=example)    # replaces them
    if old_metrics:
        print("  rerun: " + (f"{compare_rows(old_rows, list(summary.rows))} ({old_metrics})"
                             if old_rows is not None else f"the recorded metrics "
                             f"{old_metrics} could not be read: nothing to compare"), file=out)
    return 0


def recorded_rows(path: str) -> list[dict[str, Any]] | None:
    """The recorded run's metrics rows (None when its file is gone or unreadable)."""
    try:
        return [json.loads(line) for line in
                Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join("=".join(v) if isinstance(v, tuple) else str(v) for v in value) or "none"
    return "none" if value is None else str(value)


__all__ = ["recorded_options", "given_dests", "rerun"]
