"""The training losses engines optimise. They are LossDefs (graphrl/loss_def.py): the
built-ins live in graphrl/builtin_losses.py (torch is imported when they run), built from
the terms of graphrl/loss_math.py; this module re-exports them for the engines."""
from __future__ import annotations

from graphrl.builtin_losses import (BUILTIN, bradley_terry, forward_each, grpo,
                                    grpo_decoupled, ppo, ppo_decoupled, value)
from graphrl.loss_math import masked_mean

LOSS_FUNCTIONS = dict(BUILTIN)

__all__ = ["LOSS_FUNCTIONS", "masked_mean", "forward_each", "ppo", "grpo",
           "value", "bradley_terry", "ppo_decoupled", "grpo_decoupled"]
