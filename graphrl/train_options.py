"""The keyword options a traced `model.train(loss=..., ...)` takes, checked at trace time so
that a typo (`epochz=99`) or a nonsensical value is an error naming the call, not a silently
ignored argument. The hyperparameters mirror the loss functions' keyword arguments in
backends/losses.py (tests/test_error_cases.py checks that they agree)."""
from __future__ import annotations

import math
from typing import Any, Mapping

from .errors import TraceError
from .nearest import suggest

# Every loss: optimisation passes and minibatches per call (backends/engines/hf.py train).
LOOP_OPTIONS = ("epochs", "minibatches")
# loss -> its hyperparameters (floats >= 0)
LOSS_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "ppo": ("clip",),
    "grpo": ("clip", "kl_coef"),
    "value": ("value_clip",),
    "bradley_terry": (),
    "ppo_decoupled": ("clip", "behaviour_clip"),
    "grpo_decoupled": ("clip", "kl_coef", "behaviour_clip"),
}


def check_train_options(where: str, loss: str, options: Mapping[str, Any]) -> None:
    """TraceError naming the call and the option that is unknown or out of range."""
    known = LOOP_OPTIONS + LOSS_HYPERPARAMETERS.get(loss, ())
    for key, value in options.items():
        if key not in known:
            raise TraceError(f"{where}: unknown argument {key!r}{suggest(key, known)} "
                             f"(loss {loss!r} takes {', '.join(known)})")
        if key in LOOP_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TraceError(f"{where}: {key}={value!r} must be an int >= 1")
        elif (isinstance(value, bool) or not isinstance(value, (int, float))
              or not math.isfinite(value) or value < 0):
            raise TraceError(f"{where}: {key}={value!r} must be a number >= 0")


__all__ = ["check_train_options", "LOOP_OPTIONS", "LOSS_HYPERPARAMETERS"]
