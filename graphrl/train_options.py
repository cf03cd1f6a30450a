"""The keyword options a traced `model.train(loss=..., ...)` takes, checked at trace time so
that a typo (`epochz=99`) or a nonsensical value is an error naming the call, not a silently
ignored argument. A loss's own options are those its LossDef declares (graphrl/loss_def.py)
with their defaults: a value must have its default's type (a number: finite and >= 0),
and the loss's `check` refuses contradictory combinations (clip high < low, ...)."""
from __future__ import annotations

import math
from typing import Any, Mapping

from .errors import TraceError
from .loss_def import LossDef
from .nearest import suggest

# Every loss: optimisation passes and minibatches per call (backends/engines/hf.py train).
LOOP_OPTIONS = ("epochs", "minibatches")


def _number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value >= 0)


def check_train_options(where: str, loss: LossDef, options: Mapping[str, Any]) -> None:
    """TraceError naming the call and the option that is unknown, out of range or in
    contradiction with another."""
    known = LOOP_OPTIONS + tuple(loss.options)
    for key, value in options.items():
        if key not in known:
            raise TraceError(f"{where}: unknown argument {key!r}{suggest(key, known)} "
                             f"(loss {loss.name!r} takes {', '.join(known)})")
        if key in LOOP_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TraceError(f"{where}: {key}={value!r} must be an int >= 1")
            continue
        default = loss.options[key]
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:   # a number, or None: "unset" for a number
            ok, want = _number(value), "a number >= 0"
        if not ok:
            raise TraceError(f"{where}: {key}={value!r} must be {want}")
    problem = loss.check(loss.resolved(options)) if loss.check else None
    if problem:
        raise TraceError(f"{where}: loss {loss.name!r}: {problem}")


__all__ = ["check_train_options", "LOOP_OPTIONS"]
