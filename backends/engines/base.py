"""The model-engine interface: what a backend needs from whatever runs a model.

Payloads cross this interface as dicts of field name -> tensor, with the fields that
graphrl.signatures lists for each payload kind.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

Payload = Mapping[str, Any]


class ModelEngine(Protocol):
    """One model on one device. `version` counts completed train steps."""

    version: int

    def generate(self, prompts: Payload, *, max_new_tokens: int, temperature: float,
                 samples: int, seed: int) -> dict[str, Any]:
        """Sample continuations: a Rollout (tokens, response_mask)."""

    def forward(self, rollout: Payload) -> dict[str, Any]:
        """No-grad pass: LogProbs (lm head), Values (value head) or Scores (score head)."""

    def train(self, inputs: Mapping[str, Payload], *, loss: Any, seed: int,
              **hyper: Any) -> dict[str, float]:
        """Optimise `loss` (a LossDef, graphrl/loss_def.py, or a built-in's name) with its
        options `hyper` on the named input payloads; returns the loss's stats."""

    def export_weights(self) -> dict[str, Any]:
        """Named tensors of the full weights (copies)."""

    def load_weights(self, named: Mapping[str, Any]) -> None:
        """Replace the weights with these named tensors (same names and shapes)."""

    def offload(self) -> None:
        """Move weights and optimizer state to host memory."""

    def onload(self) -> None:
        """Bring them back to the engine's device."""


def loss_tokens(mb: Mapping[str, Mapping[str, Any]]) -> float:
    """How much of a minibatch's loss one of its micro-batches carries, for engines that
    split a minibatch: its response tokens (the token-mean losses), else its rows
    (pairwise losses). Weighting micro-batch losses by these shares makes the summed
    gradient that of the whole minibatch's loss. The default measure; a loss declares
    its own (LossDef.measure: per-sequence means weigh rows)."""
    r = mb.get("rollout")
    if r is not None and "response_mask" in r:
        return float(r["response_mask"].sum())
    return float(next(iter(next(iter(mb.values())).values())).shape[0])


def move_module_and_optimizer(module: Any, optimizer: Any, device: Any) -> None:
    """Move a module and its optimizer's per-parameter state tensors to `device`
    (offload/onload; scalar state such as Adam's step stays where it is)."""
    import torch

    module.to(device)
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:
                state[k] = v.to(device)


def fit_micro_batches(rows: int, planned: int) -> int:
    """The micro-batches a split engine runs: the plan's count, or the largest count below
    it that divides the rows it has (the plan's count is sized for the planning batch,
    not every batch); engines report the count they ran."""
    return max(k for k in range(1, max(1, min(planned, rows)) + 1) if rows % k == 0)
