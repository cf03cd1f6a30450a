"""What a compile with `--staleness K` found about asynchronous steps: the best async
plan, its lowered step, whether it was chosen and, where it lost or could not run, why
(graphrl/async_compile.py fills it, `graphrl compile` and `graphrl compare` print it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .async_cost import STALENESS_NOTE, AsyncPlan


@dataclass(frozen=True)
class AsyncReport:
    """One compile's asynchronous search.

    `bound`: the user's K; `staleness`: the K the plan runs (0: synchronous); `plan`: the
    best async plan whose pools could be placed (None: none could); `lowered_seconds`:
    its lowered step as the executors run it (None: not lowered); `skipped`: (pools, why)
    for each split that could not run; `why`: why the plan lost or why async is
    infeasible ("" where async was chosen)."""

    bound: int
    staleness: int
    sync_seconds: float
    plan: AsyncPlan | None
    lowered_seconds: float | None
    lower_bound: float | None
    skipped: tuple[tuple[str, str], ...] = ()
    why: str = ""
    sync_generate_seconds: float | None = None   # the synchronous plan's generate call
    stream: Any = None         # the lowered plan's graphrl.stream_cost.StreamChoice
    stream_split: Any = None   # its graphrl.stream_train.SplitReport

    @property
    def step_seconds(self) -> float | None:
        """The best async plan's step: lowered where it was, else as priced."""
        if self.lowered_seconds is not None:
            return self.lowered_seconds
        return self.plan.step_seconds if self.plan is not None else None

    def headline(self) -> str:
        """'async staleness 1 on 32+32 GPUs: 93.07 s vs sync 113.79 s: <verdict>'."""
        if self.plan is None:
            return f"async infeasible (staleness <= {self.bound}): {self.why}"
        step = self.step_seconds
        head = (f"async staleness {self.plan.staleness} on {self.plan.pools} GPUs: "
                f"{step:.2f} s vs sync {self.sync_seconds:.2f} s")
        if self.staleness:
            return f"{head}: async pays, running staleness {self.staleness}"
        return f"{head}: sync kept: {self.why}"

    def lines(self) -> list[str]:
        out = [self.headline()]
        if self.plan is not None:
            lowered = ("" if self.lowered_seconds is None else
                       f"; lowered plan {self.lowered_seconds:.2f} s")
            lb = f"{self.lower_bound:.2f} s" if self.lower_bound is not None else "n/a"
            out.append(f"  priced: {self.plan.text()}{lowered} (async lower bound {lb})")
        if self.bound > 1:
            more = "2" if self.bound == 2 else f"2..{self.bound}"
            out.append(f"  staleness {more} not used: {STALENESS_NOTE}")
        if self.skipped:
            out.append(f"  {len(self.skipped)} split(s) skipped: " + "; ".join(
                f"{pools}: {why}" for pools, why in self.skipped[:3])
                + (" ..." if len(self.skipped) > 3 else ""))
        return out


def why_lost(plan: AsyncPlan, step: float, sync_seconds: float, n_gpus: int,
             sync_generate: float | None) -> str:
    """The term that makes the async step (`step`, the plan's lowered or priced step)
    no faster than the synchronous one, in words."""
    if step < sync_seconds:
        return ""
    if plan.step_seconds < sync_seconds:
        return (f"priced at {plan.step_seconds:.2f} s, its lowered plan takes {step:.2f} s "
                "(the training pool as scheduled with its reshards and memory moves, the "
                "stream cut chosen again)")
    gen = plan.head + plan.tail
    if plan.train_seconds > gen:
        return (f"training-bound: the other calls take {plan.train_seconds:.2f} s on "
                f"{plan.train_gpus} GPUs and generating a batch {gen:.2f} s on "
                f"{plan.gen_gpus}, so overlapping them hides at most {gen:.2f} s, while the "
                f"training pool has {plan.gen_gpus} GPUs fewer than the synchronous plan's "
                f"and the weight push adds {plan.push_seconds:.2f} s")
    sync_gen = (f"; synchronous generation takes {sync_generate:.2f} s on all {n_gpus}"
                if sync_generate is not None else "")
    wait = (f", and the head waits {plan.train_seconds - plan.head:.2f} s for the training "
            "pool before the push" if plan.train_seconds > plan.head else "")
    return (f"generation-bound (generation pool too small): its tail alone (the batch's "
            f"longest responses after the push) takes {plan.tail:.2f} s and the head "
            f"{plan.head:.2f} s on {plan.gen_gpus} GPUs{wait}{sync_gen}")


def infeasible_why(skipped: tuple[tuple[str, str], ...], gens: int) -> str:
    """Why no split ran: the step's generate calls, or the skipped splits' reasons."""
    if gens != 1:
        return (f"the step has {gens} generate calls; asynchronous plans split one "
                "generate call from the rest")
    if not skipped:
        return "the cluster has no split into two pools"
    reasons = sorted({why for _, why in skipped})
    return (f"no split of the cluster into a generation and a training pool runs "
            f"({len(skipped)} tried): " + "; ".join(reasons[:3])
            + (" ..." if len(reasons) > 3 else ""))


__all__ = ["AsyncReport", "infeasible_why", "why_lost"]
