"""Training losses as declared objects: what `model.train(loss=...)` optimises.

    @gr.loss("my_pg", inputs=(("rollout", ROLLOUT), ("advantages", ADVANTAGES)),
             stats=("loss",), options={"scale": 1.0}, weight="tokens")
    def my_pg(forward, mb, *, scale):
        lp = forward(mb["rollout"])
        ...
        return loss_tensor, {"loss": loss_tensor.item()}

A LossDef carries its function and its contract: the named payload inputs (the tracer
checks a train call against them), the stats it reports (the train node's Stats
payload), its keyword options with their defaults (anything else is a trace-time error)
and the measure its micro-batches are weighted by (`weight`: "tokens" for a mean over
response tokens, "rows" for a mean over sequences), so that every engine's split of a
minibatch over data-parallel ranks and micro-batches sums to the whole minibatch's
gradient. The function is `fn(forward, mb, **options) -> (loss tensor, stats dict)`,
with `forward(payload)` the engine's differentiable head quantity (per-token log-probs,
values or per-sequence scores) and `mb` the minibatch's named payloads.

Nothing is registered globally: a step passes the LossDef itself
(`policy.train(loss=my_pg, ...)`), the traced Program carries the losses its train
nodes use (as it carries ops), and the backends hand that object to the engines (on Ray
it travels to the actors pickled by value when it comes from a user's file). The
built-ins (graphrl/builtin_losses.py) are LossDefs made the same way; a name string
names a built-in.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from .errors import TraceError, UsageError
from .nearest import suggest

WEIGHTS = ("tokens", "rows")


class LossFailed(RuntimeError):
    """A loss function raised or returned a non-finite value (the backends add the node
    and iteration)."""


@dataclass(frozen=True)
class LossDef:
    """A training loss: `fn(forward, mb, **options) -> (loss, stats)` and its contract.

    inputs: (name, payload kind) of each data input, in call order; `optional` names
      inputs a call may leave out (see `input_names`).
    stats: the stats it reports (each call's stats dict has these keys).
    options: keyword option -> default; `check(options)` returns an error message for a
      contradictory combination (None when fine); `prepare(options)` rewrites a call's
      options into node attributes (scalars) before they are checked.
    weight: "tokens" or "rows" (or a function of the options giving one): how much of a
      minibatch's loss a part of it carries (module docstring).
    """

    name: str
    fn: Callable[..., Any]
    inputs: tuple[tuple[str, str], ...]
    stats: tuple[str, ...] = ("loss",)
    options: Mapping[str, Any] = field(default_factory=dict)
    optional: tuple[str, ...] = ()
    weight: Any = "tokens"
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    source: str = ""     # where it was defined (file), for error messages

    def __hash__(self) -> int:
        return hash((self.name, self.source))

    def __reduce__(self) -> tuple:
        """graphrl's own losses pickle by reference (the module attribute is this
        LossDef, not its function); others by value (Ray's cloudpickle carries the
        function of a user's file, which the actors cannot import)."""
        module = getattr(self.fn, "__module__", "") or ""
        name = getattr(self.fn, "__name__", "")
        if module.startswith("graphrl.") and \
                getattr(sys.modules.get(module), name, None) is self:
            return (_imported, (module, name))
        return (LossDef, tuple(getattr(self, f.name) for f in fields(self)))

    def where(self) -> str:
        return f"loss {self.name!r}" + (f" ({self.source})" if self.source else "")

    def input_names(self, given: int) -> list[str]:
        """The names of a train node's `given` data inputs, in order: all of them, or
        with the optional ones left out when fewer were given."""
        names = [n for n, _ in self.inputs]
        if given == len(names) - len(self.optional):
            names = [n for n in names if n not in self.optional]
        return names

    def resolved(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options (as `prepare` writes them) with defaults filled in (only the
        loss's own)."""
        given = self.prepare(dict(options)) if self.prepare else options
        return {**self.options, **{k: v for k, v in given.items() if k in self.options}}

    def _strict(self, options: Mapping[str, Any]) -> dict[str, Any]:
        given = self.prepare(dict(options)) if self.prepare else options
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise UsageError(f"{self.where()}: unknown option(s) {', '.join(unknown)} "
                             f"(it takes {', '.join(self.options) or 'none'})")
        return self.resolved(given)

    def weight_of(self, options: Mapping[str, Any]) -> str:
        w = self.weight(self.resolved(options)) if callable(self.weight) else self.weight
        return str(w)

    def measure(self, mb: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> float:
        """How much of its minibatch's loss the payloads `mb` carry: response tokens
        (weight "tokens", where the payloads hold a rollout) or rows."""
        r = mb.get("rollout")
        if self.weight_of(options) == "tokens" and r is not None and "response_mask" in r:
            return float(r["response_mask"].sum())
        return float(next(iter(next(iter(mb.values())).values())).shape[0])

    def __call__(self, forward: Any, mb: Mapping[str, Mapping[str, Any]],
                 **options: Any) -> tuple[Any, dict[str, float]]:
        """The loss and its stats (options not given take their defaults; one it does
        not declare is an error, never ignored)."""
        return self.fn(forward, mb, **self._strict(options))

    def run(self, forward: Any, mb: Mapping[str, Mapping[str, Any]],
            options: Mapping[str, Any]) -> tuple[Any, dict[str, float]]:
        """Call the function; LossFailed naming the loss when it raises or returns a
        loss that is not finite (nothing is trained on it)."""
        resolved = self._strict(options)
        try:
            out = self.fn(forward, mb, **resolved)
        except Exception as e:  # noqa: BLE001  the user's code: name it, keep the cause
            raise LossFailed(f"{self.where()} raised {type(e).__name__}: {e}") from e
        value, stats = out if isinstance(out, tuple) and len(out) == 2 else (None, None)
        if not hasattr(value, "detach") or getattr(value, "dim", lambda: 1)() != 0 \
                or not isinstance(stats, Mapping):
            raise LossFailed(f"{self.where()} must return (scalar loss tensor, stats dict), "
                             f"got {type(out).__name__}")
        missing = [k for k in self.stats if k not in stats]
        if missing:
            raise LossFailed(f"{self.where()} returned stats without "
                             f"{', '.join(missing)} (it declares {', '.join(self.stats)})")
        if not math.isfinite(float(value.detach())):
            raise LossFailed(f"{self.where()} returned a non-finite loss "
                             f"({float(value.detach())}); no update was made")
        return value, stats


def _imported(module: str, name: str) -> LossDef:
    """The LossDef `name` of module `module` (unpickling a built-in)."""
    import importlib

    return getattr(importlib.import_module(module), name)


def loss(name: str, *, inputs: Any, stats: Any = ("loss",),
         options: Mapping[str, Any] | None = None, optional: Any = (), weight: Any = "tokens",
         check: Callable[[Mapping[str, Any]], str | None] | None = None,
         prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Callable[[Callable[..., Any]], LossDef]:
    """Decorator turning `fn(forward, mb, **options) -> (loss, stats)` into a LossDef
    (see the module docstring). UsageError for a malformed declaration."""
    def wrap(fn: Callable[..., Any]) -> LossDef:
        where = f"@loss({name!r})"
        if not isinstance(name, str) or not name.isidentifier():
            raise UsageError(f"{where}: a loss name is an identifier")
        ins = tuple((str(n), str(k)) for n, k in inputs)
        if not ins or len({n for n, _ in ins}) != len(ins):
            raise UsageError(f"{where}: inputs must be distinct (name, payload kind) pairs")
        if any(o not in dict(ins) for o in optional):
            raise UsageError(f"{where}: optional inputs {tuple(optional)} are not all inputs")
        if not callable(weight) and weight not in WEIGHTS:
            raise UsageError(f"{where}: weight={weight!r} (known: {', '.join(WEIGHTS)})")
        code = getattr(fn, "__code__", None)
        return LossDef(name, fn, ins, tuple(stats), dict(options or {}), tuple(optional),
                       weight, check, prepare, code.co_filename if code else "")
    return wrap


def resolve(loss: Any, known: Mapping[str, LossDef], where: str,
            error: type[Exception] = TraceError) -> LossDef:
    """A train call's loss: a LossDef as is, or a name among `known` (`error` with a
    suggestion otherwise)."""
    if isinstance(loss, LossDef):
        return loss
    if not isinstance(loss, str) or loss not in known:
        raise error(f"{where}: unknown loss {loss!r} (known: {', '.join(known)}; "
                         f"or pass a loss made with @graphrl.loss){suggest(loss, known)}")
    return known[loss]


__all__ = ["LossDef", "LossFailed", "loss", "resolve", "WEIGHTS"]
