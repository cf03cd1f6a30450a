"""The training loop every engine shares: minibatches, micro-batches and loss weighting.

`train_epochs` runs `epochs` passes over the batch in `minibatches` random minibatches,
drawn from one seeded permutation (the same rows in every engine and on every rank), and
averages the losses' stats over the minibatches; an engine supplies only what it does
with one minibatch (`step`). Engines that split a minibatch (over data-parallel ranks
and into micro-batches) use `split_rows`, `micro_batches` and `loss_weights`: each
micro-batch's loss is weighted by its share of the minibatch's loss tokens (response
tokens for token-mean losses, rows for per-sequence means and pairwise ones: the
loss's `measure`, graphrl/loss_def.py), so the summed gradient equals the gradient of
the whole minibatch's loss, and `WeightedStats` sums the stats with the same weights.
A loss is a LossDef (or a built-in's name); `bind_loss` fixes a call's options, checks
each value it returns (loss_def.LossDef.run) and gives the measure.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch

from graphrl.errors import UsageError

from graphrl.builtin_losses import BUILTIN
from graphrl.loss_def import LossDef, resolve

from .base import loss_tokens
from .kl_control import refuse_adaptive

Inputs = Mapping[str, Mapping[str, Any]]
Reduce = Callable[[torch.Tensor], None]     # an in-place sum over ranks (all_reduce)


Measure = Callable[[Mapping[str, Mapping[str, Any]]], float]


def loss_function(model: str, loss: Any) -> LossDef:
    """A train call's loss: a LossDef, or a built-in's name."""
    return resolve(loss, BUILTIN, f"model {model}", UsageError)


class BoundLoss:
    """A loss with a train call's options: `loss_fn(forward, mb, **options)` as the
    engines call it (each value checked: LossDef.run), and `measure(mb)`, the share of a
    minibatch's loss that payloads `mb` carry (LossDef.measure)."""

    def __init__(self, model: str, loss: Any, options: Mapping[str, Any]):
        self.defn = loss.defn if isinstance(loss, BoundLoss) else loss_function(model, loss)
        self.options = dict(options)
        # set by an engine that keeps an adaptive KL coefficient (kl_control.py)
        self.kl_controlled = False

    def __call__(self, forward: Any, mb: Inputs, **options: Any) -> tuple[Any, dict]:
        return self.defn.run(forward, mb, options)

    def measure(self, mb: Inputs) -> float:
        return self.defn.measure(mb, self.options)


def bind_loss(model: str, loss: Any, options: Mapping[str, Any]) -> BoundLoss:
    return loss if isinstance(loss, BoundLoss) else BoundLoss(model, loss, options)


def batch_rows(inputs: Inputs) -> int:
    """The rows of a train call's batch (every payload has the same)."""
    return next(iter(next(iter(inputs.values())).values())).shape[0]


def minibatch_indices(model: str, n: int, *, seed: int, epochs: int,
                      minibatches: int) -> Iterator[torch.Tensor]:
    """Row indices of each minibatch, epoch after epoch, from one seeded permutation per
    epoch (a CPU generator: identical on every engine, device and rank)."""
    if n % minibatches:
        raise UsageError(f"{model}.train: batch {n} does not split into "
                         f"{minibatches} minibatches")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield from torch.randperm(n, generator=gen).chunk(minibatches)


def train_epochs(model: str, inputs: Inputs, *, loss: Any, seed: int, epochs: int,
                 minibatches: int, step: Callable[[BoundLoss, torch.Tensor],
                                                  Mapping[str, float]],
                 options: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Run `step(loss_fn, minibatch_rows)` (one optimizer step, returning the loss's
    stats) on every minibatch; the stats averaged over the minibatches. `loss`: a
    BoundLoss, a LossDef or a built-in's name (then bound to `options`)."""
    loss_fn = bind_loss(model, loss, options or {})
    if not loss_fn.kl_controlled:
        refuse_adaptive(model, "this", loss_fn.defn, loss_fn.options)
    left_out = [k for k in loss_fn.defn.optional if k not in inputs]
    if left_out and epochs * minibatches > 1:
        raise UsageError(f"{model}.train: loss {loss_fn.defn.name!r} without "
                         f"{', '.join(left_out)} (on-policy) needs one optimizer pass, got "
                         f"epochs={epochs}, minibatches={minibatches}")
    totals: dict[str, float] = {}
    count = 0
    for idx in minibatch_indices(model, batch_rows(inputs), seed=seed, epochs=epochs,
                                 minibatches=minibatches):
        for k, v in step(loss_fn, idx).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        count += 1
    return {k: v / count for k, v in totals.items()}


def split_rows(model: str, n: int, parts: int, what: str) -> list[slice]:
    """`parts` equal consecutive slices of n rows, or a UsageError naming the call."""
    if n % parts:
        raise UsageError(f"{model}.{what}: {n} rows do not split into {parts} equal parts")
    k = n // parts
    return [slice(i * k, (i + 1) * k) for i in range(parts)]


def micro_batches(model: str, inputs: Inputs, rows: torch.Tensor, count: int,
                  move: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                  ) -> list[dict[str, dict[str, Any]]]:
    """The payloads of `rows` (a minibatch, or this rank's part of one) in `count` equal
    consecutive micro-batches, each tensor passed through `move` (to the device)."""
    return [{k: {f: move(t[rows[s]]) for f, t in p.items()} for k, p in inputs.items()}
            for s in split_rows(model, rows.numel(), count, "train (micro-batches)")]


def loss_weights(mbs: list[Mapping[str, Mapping[str, Any]]],
                 reduce: Reduce | None = None, measure: Measure = loss_tokens) -> torch.Tensor:
    """Each micro-batch's share of the minibatch's loss (float64) by `measure` (the
    loss's: BoundLoss.measure); `reduce` sums the total over the data-parallel ranks
    that hold the minibatch's other parts."""
    weights = torch.tensor([measure(mb) for mb in mbs], dtype=torch.float64)
    total = weights.sum().clone()
    if reduce is not None:
        reduce(total)
    return weights / total.clamp(min=1.0)


def rank_share(inputs: Inputs, rows: torch.Tensor, minibatch: torch.Tensor,
               ranks: int, measure: Measure = loss_tokens) -> float:
    """The factor on a data-parallel rank's mean loss (and its stats) over `rows` so that
    the ranks' gradients, averaged (DDP, FSDP), are the gradient of the whole
    `minibatch`'s loss: `ranks` x the rank's share of the minibatch's loss by `measure`
    (the loss's: response tokens or rows). 1 where every rank holds as many."""
    def share(idx: torch.Tensor) -> float:
        return measure({k: {f: t[idx] for f, t in p.items()} for k, p in inputs.items()})
    return ranks * share(rows) / max(share(minibatch), 1.0)


def part_tokens(inputs: Inputs, measure: Measure = loss_tokens) -> float:
    """A train call's whole batch by `measure` (the loss's: response tokens or rows)."""
    return float(measure(inputs))


class TwoParts:
    """One optimizer step over a batch given in two train calls (graphrl/stream_train.py:
    the head-finished groups, then the rest). The loss is a mean over the batch's loss
    tokens, so its gradient is (t_a g_a + t_b g_b) / (t_a + t_b) with g_x the gradient of
    part x's own mean and t_x its tokens: the head call keeps a copy of g_a (no step;
    other calls may run on the engine before the rest); the rest call, which knows t_b
    only then, computes g_b weighted t_b / (t_a + t_b), adds g_a weighted
    t_a / (t_a + t_b), and steps — the update of the unsplit call up to float summation
    order, as micro-batches (loss_weights) are. Stats combine with the same weights. The
    state lives on the engine between the calls, keyed by the call's seed (both parts of
    one train share it)."""

    def __init__(self, engine: Any, part: str, seed: int, tokens: float, carried: Any):
        self.engine, self.part, self.seed, self.tokens = engine, part, seed, tokens
        self.carried = carried   # the head's (seed, tokens, stats, gradients)
        self.zero_grad = True

    @classmethod
    def begin(cls, engine: Any, part: str, inputs: Inputs, seed: int,
              passes: int, measure: Measure = loss_tokens) -> "TwoParts | None":
        if not part:
            return None
        name = engine.decl.name
        if part not in ("head", "rest"):
            raise UsageError(f"{name}.train: part={part!r} (known: head, rest)")
        if passes != 1:
            raise UsageError(f"{name}.train: a train in two parts takes one optimizer pass, "
                             f"got epochs x minibatches = {passes}")
        carried = getattr(engine, "_head_part", None)
        engine._head_part = None
        if part == "rest" and (carried is None or carried[0] != seed):
            raise UsageError(f"{name}.train: part='rest' without its head part (seed {seed})")
        return cls(engine, part, seed, part_tokens(inputs, measure), carried)

    def _total(self) -> float:
        return max(self.carried[1] + self.tokens, 1.0)

    def weight(self) -> float:
        """The factor on this part's loss."""
        return 1.0 if self.part == "head" else self.tokens / self._total()

    def finish(self, params: Any, stats: Mapping[str, float]) -> dict[str, float]:
        """After this part's backward (and data-parallel averaging): the head keeps its
        gradients and stats; the rest adds the head's to its own. Returns the stats."""
        params = list(params)
        if self.part == "head":
            grads = [p.grad.detach().clone() if p.grad is not None else None
                     for p in params]
            self.engine._head_part = (self.seed, self.tokens, dict(stats), grads)
            return dict(stats)
        _, head, first, grads = self.carried
        w = head / self._total()
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g * w
                else:
                    p.grad.add_(g, alpha=w)
        return {k: (head * float(first.get(k, 0.0)) + self.tokens * float(v)) / self._total()
                for k, v in stats.items()}


class WeightedStats:
    """Stats of a minibatch's micro-batches, summed with their loss weights."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, weight: float, stats: Mapping[str, float]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + weight * float(v)

    def result(self, reduce: Reduce | None = None,
               names: list[str] | None = None) -> dict[str, float]:
        """The sums (summed over ranks by `reduce`); `names` fixes their order where
        some ranks saw none (pipeline stages before the last)."""
        names = sorted(self.sums) if names is None else names
        vec = torch.tensor([self.sums.get(k, 0.0) for k in names], dtype=torch.float64)
        if reduce is not None:
            reduce(vec)
        return dict(zip(names, vec.tolist()))


__all__ = ["train_epochs", "loss_function", "BoundLoss", "bind_loss", "batch_rows", "minibatch_indices", "split_rows",
           "micro_batches", "loss_weights", "part_tokens", "rank_share", "TwoParts",
           "WeightedStats"]
