"""The command line's one error path: what a failure prints and the exit status.

- Bad input (a graphrl error: flags, files, configs, plans, a step graphrl cannot trace):
  one line `graphrl: error: ...`, exit 2.
- A failure of a run (ExecutionError: a node failed, a worker died): one line, exit 1;
  but an op's user code failing (OpError: a reward raised, hung or returned NaN) is the
  user's: exit 2.
- An exception raised in the user's own code (the example file or code it calls, not
  graphrl): the user's frames only (file, line, code), then one line saying it came from
  their code; exit 2.
- Any other exception is a bug in graphrl: the full traceback and a line saying so; exit 1.
- Ctrl-C: exit 130. `debug=True` (`--debug`) prints every traceback in full.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

from ..errors import ExecutionError, GraphRLError, OpError

USAGE_EXIT = 2
FAILURE_EXIT = 1
INTERRUPT_EXIT = 130
DEBUG_FLAG = "--debug"


def _graphrl_dirs() -> tuple[str, ...]:
    import graphrl
    import graphrl.backends
    import graphrl.passes

    dirs = [Path(graphrl.__file__).parent]
    for pkg in (graphrl.backends, graphrl.passes):
        dirs.extend(Path(p) for p in pkg.__path__)
    return tuple(str(d.resolve()) + "/" for d in dirs)


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(str(Path(paths[k]).resolve()) + "/" for k in ("stdlib", "purelib", "platlib")
                 if k in paths)


def frame_owner(filename: str) -> str:
    """'graphrl', 'library' (stdlib, site-packages, frozen importlib) or 'user'."""
    if filename.startswith("<"):
        return "library"
    path = str(Path(filename).resolve())
    if path.startswith(_graphrl_dirs()):
        return "graphrl"
    if path.startswith(_library_dirs()):
        return "library"
    return "user"


def from_user_code(exc: BaseException) -> bool:
    """True when the innermost frame that is not library code is the user's: the
    exception was raised by their code, or by a library their code called."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return frame_owner(exc.filename) == "user"
    owners = [frame_owner(f.filename) for f in traceback.extract_tb(exc.__traceback__)]
    mine = [o for o in owners if o != "library"]
    return bool(mine) and mine[-1] == "user"


def user_frames_text(exc: BaseException) -> str:
    """The exception's frames in user code (file, line, code), then the exception line."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if frame_owner(f.filename) == "user"]
    lines = traceback.format_list(frames)
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


def _user_where(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}, line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if frame_owner(f.filename) == "user"]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def report(exc: BaseException, *, debug: bool = False, err: TextIO | None = None) -> int:
    """Print `exc` as the command line reports it; return the exit status."""
    err = err or sys.stderr
    if isinstance(exc, KeyboardInterrupt):
        print("graphrl: interrupted", file=err)
        return INTERRUPT_EXIT
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=err)
    if isinstance(exc, GraphRLError):
        print(f"graphrl: error: {exc}", file=err)
        run_failure = isinstance(exc, ExecutionError) and not isinstance(exc, OpError)
        return FAILURE_EXIT if run_failure else USAGE_EXIT
    if from_user_code(exc):
        if not debug:
            print("error in your code (its frames; --debug shows graphrl's too):", file=err)
            print(user_frames_text(exc), end="", file=err)
        print(f"graphrl: error: your code{_user_where(exc)} raised "
              f"{_one_line(exc).splitlines()[0]}", file=err)
        return USAGE_EXIT
    if not debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=err)
    print(f"graphrl: error: internal error, a bug in graphrl (please report it with the "
          f"traceback above): {_one_line(exc).splitlines()[0]}", file=err)
    return FAILURE_EXIT


def guarded(fn: Callable[[], Any], debug: bool = False) -> int:
    """Run fn(); its int result is the exit status; failures go through `report`."""
    try:
        return int(fn() or 0)
    except SystemExit as e:  # argparse: --help (0) or its own usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else USAGE_EXIT)
    except BaseException as e:  # noqa: BLE001 - the one place every failure is reported
        return report(e, debug=debug)


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove `--debug` (anywhere before a bare `--`) from argv."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:end]
    return [a for i, a in enumerate(argv) if i >= end or a != DEBUG_FLAG], debug


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors in graphrl's form: usage, then `graphrl: error: ...`
    (subcommand parsers would otherwise say `graphrl run: error:`), exit 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"graphrl: error: {message}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT)


__all__ = ["report", "guarded", "split_debug", "from_user_code", "frame_owner",
           "ArgumentParser", "USAGE_EXIT", "FAILURE_EXIT", "INTERRUPT_EXIT"]
