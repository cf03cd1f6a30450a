"""An Experiment bundles what an example defines: its models, step, data and reward.

Examples expose `build(options) -> Experiment`; `graphrl run` and `python examples/X.py`
both go through it. RunOptions are the command-line options every example takes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .trace import Model, Program, trace
from .types import PayloadSpec


@dataclass(frozen=True)
class RunOptions:
    iterations: int | None = None  # None: the example's default
    seed: int = 0
    metrics: str | None = None
    trace: str | None = None
    device: str = "cpu"
    batch_size: int | None = None
    quiet: bool = False


@dataclass(frozen=True)
class Experiment:
    """name: the step's name; data(iteration) gives that iteration's input payloads;
    reward: the graph output (a Scores payload in [0, 1]) reported as reward_mean;
    prepare(engines) runs once before RL (e.g. reward-model training) and returns
    metrics to report."""

    name: str
    step: Callable[..., Any]
    models: tuple[Model, ...]
    inputs: Mapping[str, PayloadSpec]
    data: Callable[[int], Mapping[str, Any]]
    reward: str
    iterations: int = 30
    prepare: Callable[[Mapping[str, Any]], Mapping[str, float]] | None = None
    description: str = ""
    notes: Mapping[str, Any] = field(default_factory=dict)

    def program(self) -> Program:
        return trace(self.step, list(self.models), name=self.name, **self.inputs)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iterations", type=positive_int, metavar="N",
                   help="RL iterations to run (default: the example's own, e.g. 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--metrics", metavar="FILE",
                   help="write one JSON line per iteration (iteration, reward_mean, "
                        "step_seconds, seconds per call, losses)")
    p.add_argument("--trace", metavar="FILE",
                   help="write the measured timeline as Chrome trace JSON (open in "
                        "ui.perfetto.dev)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the models run (default cpu)")
    p.add_argument("--batch-size", type=positive_int, metavar="B",
                   help="prompts per iteration (default: the example's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_options(ns: argparse.Namespace) -> RunOptions:
    return RunOptions(ns.iterations, ns.seed, ns.metrics, ns.trace, ns.device, ns.batch_size,
                      ns.quiet)
