"""The evaluation flags of example runs (--eval-data/--eval-every/--eval-samples/
--eval-greedy/--eval-threshold), see graphrl.evaluation."""
from __future__ import annotations

import argparse
import math
from typing import Any

from ..evaluation import DEFAULT_THRESHOLD
from .argtypes import positive_int


def finite_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_eval_options(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("evaluation (held-out prompts, part of the step's graph)")
    e.add_argument("--eval-every", type=positive_int, metavar="N",
                   help="evaluate after every N-th training step: the policy answers held-out "
                        "prompts (--eval-data; synthetic examples: a fixed seeded held-out "
                        "set), scored by the run's reward; eval/... keys in that "
                        "iteration's metrics row")
    e.add_argument("--eval-data", metavar="FILE",
                   help="held-out prompts: JSONL or Parquet with the fields of --data "
                        "(--prompt-field, the reward's fields); all rows every evaluation")
    e.add_argument("--eval-samples", type=positive_int, default=1, metavar="K",
                   help="responses per held-out prompt, sampled as in training; reports "
                        "eval/pass@1 and eval/pass@K, the unbiased estimator of Chen et al. "
                        "2021 (default 1)")
    e.add_argument("--eval-greedy", action="store_true",
                   help="also decode each held-out prompt at temperature 0: "
                        "eval/greedy_pass@1, eval/greedy_reward_mean")
    e.add_argument("--eval-threshold", type=finite_number, default=DEFAULT_THRESHOLD,
                   metavar="R",
                   help="a held-out response counts as correct when its reward >= R "
                        f"(default {DEFAULT_THRESHOLD}: right for 0/1 rewards)")


def eval_fields(ns: argparse.Namespace) -> dict[str, Any]:
    """RunOptions fields of the evaluation flags (defaults where a command lacks them)."""
    return dict(eval_data=getattr(ns, "eval_data", None),
                eval_every=getattr(ns, "eval_every", None),
                eval_samples=getattr(ns, "eval_samples", 1),
                eval_greedy=getattr(ns, "eval_greedy", False),
                eval_threshold=getattr(ns, "eval_threshold", DEFAULT_THRESHOLD))
