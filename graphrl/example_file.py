"""Load an example file (`graphrl run FILE.py` executes FILE as Python) and check what its
build(options) returns, and that the options name only the example's models."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError
from .nearest import suggest


def load_python_file(path: str, what: str) -> Any:
    """Execute the Python file at `path` (a user's example or reward) as a module.
    `what` prefixes errors about the file itself; errors raised by its code are the
    user's and keep their frames."""
    file = Path(path)
    if file.suffix != ".py":
        raise UsageError(f"{what}: {path} is not a Python file (.py)")
    if not file.is_file():
        raise UsageError(f"{what}: no such file {path}")
    spec = importlib.util.spec_from_file_location(f"graphrl_user_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise UsageError(f"{what}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        source = file.read_bytes()
    except OSError as e:
        raise UsageError(f"{what}: {path}: {e.strerror}") from None
    if b"\0" in source:
        raise UsageError(f"{what}: {path} is not a Python file (it contains NUL bytes)")
    spec.loader.exec_module(module)  # errors here are the user's: reported with their frames
    return module


def load_example(path: str) -> Callable[[Any], Any]:
    """The example's build(options), wrapped so that it returns a checked Experiment."""
    if Path(path).suffix != ".py":
        raise UsageError(f"{path}: an example is a Python file (.py) defining "
                         "build(options) -> Experiment")
    if not Path(path).is_file():
        raise UsageError(f"no such example file: {path}")
    module = load_python_file(path, "example")
    build = getattr(module, "build", None)
    if not callable(build):
        raise UsageError(f"{path} defines no build(options) -> Experiment function")

    def checked_build(options: Any) -> Any:
        from .experiment import Experiment

        exp = build(options)
        if not isinstance(exp, Experiment):
            raise UsageError(f"{path}: build(options) returned {type(exp).__name__}, "
                             "expected a graphrl Experiment")
        check_roles(exp, options)
        check_loss_used(exp, options, path)
        return exp.with_precision(options)
    checked_build.__doc__ = build.__doc__
    return checked_build


def check_roles(exp: Any, options: Any) -> None:
    """--model, --model-size and --model-config may only name the example's models."""
    exp.check_roles(options)


def check_loss_used(exp: Any, options: Any, path: str) -> None:
    """--loss FILE.py:NAME must reach a train call: an example that ignores it would
    train another objective than the one asked for."""
    spec = getattr(options, "loss", None)
    if spec and spec.rpartition(":")[2] not in exp.program().losses:
        raise UsageError(f"--loss {spec}: {path} trains no loss named "
                         f"{spec.rpartition(':')[2]!r} (it does not take --loss; "
                         "examples/grpo.py does)")


def load_loss(spec: str) -> Any:
    """`FILE.py:NAME` -> the LossDef NAME defined in FILE (`--loss`)."""
    from .loss_def import LossDef

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"--loss {spec}: expected FILE.py:NAME")
    module = load_python_file(path, f"--loss {spec}")
    found = getattr(module, name, None)
    if not isinstance(found, LossDef):
        defined = [k for k, v in vars(module).items() if isinstance(v, LossDef)]
        raise UsageError(f"--loss {spec}: {path} defines no loss {name!r}"
                         f"{suggest(name, defined)} (losses there: "
                         f"{', '.join(defined) or 'none'}; make one with @graphrl.loss)")
    return found


__all__ = ["load_python_file", "load_example", "check_roles", "load_loss", "check_loss_used"]
