"""Adaptive KL control as state of the trained model's engine (a loss option
`kl_control="adaptive"`, graphrl/builtin_losses.py).

The coefficient starts at the call's `kl_coef`, is used for every minibatch of a train
call (it replaces the `kl_coef` option), and after the call is updated once from the
KL the call measured (its `kl` stat, averaged over the minibatches and, on
data-parallel ranks, over the ranks, so that every rank computes the same value):
Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2
(graphrl.loss_math.kl_controller_step). The train stats report the coefficient the call
used as `kl_coef` (its stat). It is saved and restored with the engine's checkpoint state.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from graphrl import loss_math as lm
from graphrl.errors import UsageError
from graphrl.loss_def import LossDef

Reduce = Callable[[torch.Tensor], None]     # an in-place sum over ranks (all_reduce)


class KLControl:
    """The engine's adaptive KL coefficient (None until an adaptive train call)."""

    def __init__(self) -> None:
        self.coef: float | None = None

    @staticmethod
    def adaptive(defn: LossDef, hyper: Mapping[str, Any]) -> bool:
        return defn.resolved(hyper).get("kl_control", "fixed") == "adaptive"

    def options(self, defn: LossDef, hyper: Mapping[str, Any]) -> dict[str, Any]:
        """The call's options with kl_coef the engine's coefficient (as given when the
        loss's control is fixed)."""
        if not self.adaptive(defn, hyper):
            return dict(hyper)
        if self.coef is None:
            self.coef = float(defn.resolved(hyper)["kl_coef"])
        return {**hyper, "kl_coef": self.coef}

    def update(self, model: str, defn: LossDef, hyper: Mapping[str, Any],
               stats: Mapping[str, float], ranks: int = 1,
               reduce: Reduce | None = None) -> dict[str, float]:
        """After a train call: update the coefficient from the call's `kl` stat and
        return the stats unchanged (the loss reports the coefficient it used as
        `kl_coef`). `stats` are this rank's share of the mean over `ranks` data-parallel
        ranks (their mean is the call's); `reduce` sums over the ranks."""
        if not self.adaptive(defn, hyper):
            return dict(stats)
        if "kl" not in stats:
            raise UsageError(f"{model}.train: kl_control='adaptive' needs the loss's 'kl' "
                             f"stat (loss {defn.name!r} reports {', '.join(stats)})")
        kl = torch.tensor([float(stats["kl"])], dtype=torch.float64)
        if ranks > 1:
            if reduce is None:
                raise UsageError(f"{model}.train: kl_control='adaptive' on {ranks} "
                                 "data-parallel ranks needs the engine's sum over ranks")
            reduce(kl)
            kl /= ranks
        o = defn.resolved(hyper)
        self.coef = lm.kl_controller_step(float(self.coef), float(kl[0]),
                                          float(o["kl_target"]), float(o["kl_gain"]))
        return dict(stats)


def refuse_adaptive(model: str, engine: str, defn: LossDef,
                    hyper: Mapping[str, Any]) -> None:
    """UsageError for an adaptive KL control on an engine that keeps no coefficient."""
    if KLControl.adaptive(defn, hyper):
        raise UsageError(f"{model}.train: kl_control='adaptive' is not supported by the "
                         f"{engine} engine (engines hf and fast keep the coefficient)")


__all__ = ["KLControl", "refuse_adaptive"]
