"""RunOptions' values checked when they are made (the command line's argparse types check
the same ranges first, with the flag's name): one UsageError naming the option, not a
ZeroDivisionError, a run of the default length or an overflow deep inside torch."""
from __future__ import annotations

import math
from typing import Any

from .errors import UsageError

MAX_SEED = 2**32 - 1    # numpy takes seeds below 2**32; torch seeds derived from it (seed *
# 100003 + iteration in the examples) stay far below its 2**63 limit
COUNTS = {"iterations": 1, "batch_size": 1, "prompt_len": 1, "response_len": 1,
          "checkpoint_every": 1, "keep": 1, "max_restarts": 0, "staleness": 0}
BACKENDS = ("local", "ray")
# prompts per iteration: compile simulates generation sequence by sequence, so its time
# grows with the batch (a 7B PPO step at 65536 takes ~15 s; 10 million never ends)
MAX_BATCH = 65536
SECONDS = ("call_timeout", "reward_timeout")
NONE_ALLOWED = {"iterations", "batch_size", "prompt_len", "response_len",
                "checkpoint_every", "call_timeout", "reward_timeout"}


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def check_run_options(opts: Any) -> None:
    """UsageError naming the first RunOptions field of the wrong type or range."""
    seed = opts.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{_flag('seed')}={seed!r}: expected an integer from 0 to "
                         f"{MAX_SEED}")
    for name, least in COUNTS.items():
        value = getattr(opts, name)
        if value is None and name in NONE_ALLOWED:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UsageError(f"{_flag(name)}={value!r}: expected an integer >= {least}")
    for name in SECONDS:
        value = getattr(opts, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise UsageError(f"{_flag(name)}={value!r}: expected seconds > 0")
    if opts.batch_size is not None and opts.batch_size > MAX_BATCH:
        raise UsageError(f"{_flag('batch_size')}={opts.batch_size}: at most {MAX_BATCH} "
                         "prompts per iteration")
    if opts.backend not in BACKENDS:
        raise UsageError(f"{_flag('backend')}={opts.backend!r}: expected one of "
                         f"{', '.join(BACKENDS)}")
    if opts.device not in ("cpu", "cuda"):
        raise UsageError(f"{_flag('device')}={opts.device!r}: expected cpu or cuda")


def unknown_options(given: Any, known: Any) -> None:
    """UsageError for a keyword that is no RunOptions field (with the nearest one)."""
    from .nearest import suggest

    for key in given:
        if key not in known:
            raise UsageError(f"unknown run option {key!r}{suggest(key, known)} (see "
                             "graphrl.RunOptions for the options)")


__all__ = ["check_run_options", "unknown_options", "MAX_SEED", "MAX_BATCH", "BACKENDS"]
