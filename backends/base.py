"""The interface every backend's executor offers the RL loop (graphrl.runner).

An executor runs one traced step per call: `run_step(inputs, iteration)` feeds the
step's data inputs (payload dicts by input name), carries new weights into the next
step itself, and returns a `graphrl.backends.local.StepResult` (the step's outputs,
the measured events, the wall seconds). `prepare(fn)` runs an Experiment's set-up on
engines it can hand out (e.g. reward-model training) and returns fn's metrics;
`close()` releases what the executor holds (processes, actors, a Ray session).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol


class Executor(Protocol):
    def run_step(self, inputs: Mapping[str, Any], iteration: int = 0) -> Any:
        """One step; returns a StepResult."""

    def prepare(self, fn: Callable[[Mapping[str, Any]], Mapping[str, float]]
                ) -> dict[str, float]:
        """Run an Experiment's set-up on engines by model name."""

    def export_weights(self, model: str) -> dict[str, Any]:
        """The full weights of `model` now (name -> tensor copies), e.g. to save it."""

    def close(self) -> None:
        """Release processes, actors and sessions; safe to call twice."""
