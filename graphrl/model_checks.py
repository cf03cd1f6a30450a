"""What a `Model(...)` declaration may say, checked when it is made: its name, role, head,
engine and engine options (lr, weight_decay, grad_clip, betas), so that a typo or an
impossible value is one error naming the model and the field, not a silently ignored
setting or a traceback deep inside an engine."""
from __future__ import annotations

import math
from typing import Any, Mapping

from .errors import UsageError
from .nearest import suggest

ROLES = ("policy", "reference", "reward", "critic")


def _number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


def _betas(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(_number(b) and 0 <= b < 1 for b in value))


# option -> (accepts, what it must be); what the engines read (backends/engines/hf.py
# DEFAULTS), plus `checkpoint`, the model directory the engine loads.
ENGINE_OPTIONS = {
    "lr": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v is None or (_number(v) and v >= 0),
                  "a number >= 0 (0 or None: no clipping)"),
    "betas": (_betas, "a pair of numbers in [0, 1), e.g. (0.9, 0.95)"),
    "checkpoint": (lambda v: isinstance(v, str) and bool(v), "a model directory"),
}


def check_model_fields(name: Any, role: Any, head: Any, engine: Any,
                       options: Mapping[str, Any]) -> None:
    """UsageError naming the model and the first field that is unknown or out of range."""
    from .engines import ENGINES
    from .types import HEADS

    if not isinstance(name, str) or not name.isidentifier():
        raise UsageError(f"Model name {name!r}: expected a Python identifier, e.g. 'policy'")
    where = f"model {name}"
    for field, value, known in (("role", role, ROLES), ("head", head, HEADS),
                                ("engine", engine, ENGINES)):
        if value not in known:
            raise UsageError(f"{where}: unknown {field} {value!r}{suggest(value, known)} "
                             f"(known: {', '.join(known)})")
    if not isinstance(options, Mapping):
        raise UsageError(f"{where}: options must be a dict, got {type(options).__name__}")
    for key, value in options.items():
        if key not in ENGINE_OPTIONS:
            raise UsageError(f"{where}: unknown engine option {key!r}"
                             f"{suggest(key, ENGINE_OPTIONS)} (known: "
                             f"{', '.join(k for k in ENGINE_OPTIONS if k != 'checkpoint')})")
        accepts, what = ENGINE_OPTIONS[key]
        if not accepts(value):
            raise UsageError(f"{where}: option {key}={value!r} must be {what}")


__all__ = ["ROLES", "ENGINE_OPTIONS", "check_model_fields"]
