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

    def train(self, inputs: Mapping[str, Payload], *, loss: str, seed: int,
              **hyper: Any) -> dict[str, float]:
        """Optimise `loss` on the named input payloads; returns the loss's stats."""

    def export_weights(self) -> dict[str, Any]:
        """Named tensors of the full weights (copies)."""

    def load_weights(self, named: Mapping[str, Any]) -> None:
        """Replace the weights with these named tensors (same names and shapes)."""

    def offload(self) -> None:
        """Move weights and optimizer state to host memory."""

    def onload(self) -> None:
        """Bring them back to the engine's device."""


def create_engine(engine: str, decl: Any, options: Mapping[str, Any], device: str,
                  seed: int) -> ModelEngine:
    """Build the engine a ModelDecl names: `hf` (Hugging Face models throughout) or
    `fast` (the same, generating with the static-KV-cache, continuous-batching engine)."""
    if engine == "hf":
        from .hf import HFEngine

        return HFEngine(decl, options, device=device, seed=seed)
    if engine == "fast":
        from .fast import FastEngine

        return FastEngine(decl, options, device=device, seed=seed)
    from graphrl.errors import UsageError

    raise UsageError(f"model {decl.name}: unknown engine {engine!r} (available: hf, fast)")
