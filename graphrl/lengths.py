"""Response-length distributions of a workload (`--response-lengths`).

    fixed:1024                        every response is 1024 tokens
    lognormal:mean=2048,max=16384     log-normal with that mean, truncated at max; the
                                      spread is sigma (default 1.0) of log-lengths
    empirical:FILE                    one length per line (or a JSON list) of a real run

Reasoning-style RL has long-tailed response lengths (DAPO, Yu et al. 2025, Fig. 7;
AReaL, Fu et al. 2025, §2: a few responses run to the length cap while most end far
earlier), which a serving engine exploits by refilling finished slots (continuous
batching, Yu et al. 2022 "Orca"; vLLM, Kwon et al. 2023). A log-normal is the usual
fit to generation lengths (e.g. the Splitwise traces, Patel et al. 2024, Fig. 3).

Sampling is deterministic: `quantiles(n)` is the stratified draw the planner prices
(the i-th of n sequences gets the (i + 0.5)/n quantile), `draw(n, seed)` an iid sample
for the spread of a plan's predicted generation time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError

KINDS = ("fixed", "lognormal", "empirical")
DEFAULT_SIGMA = 1.0


@dataclass(frozen=True)
class LengthDist:
    """Response lengths in tokens, each in [1, max_len]."""

    kind: str
    mean: float
    max_len: int
    sigma: float = 0.0                       # lognormal: spread of log-length
    values: tuple[int, ...] = ()             # empirical: the observed lengths

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown length distribution {self.kind!r} (known: {', '.join(KINDS)})")
        if self.max_len < 1 or not 1 <= self.mean <= self.max_len:
            raise ValueError(f"response lengths need 1 <= mean ({self.mean:g}) <= max "
                             f"({self.max_len})")

    @property
    def is_fixed(self) -> bool:
        return self.kind == "fixed" or (self.kind == "empirical" and len(set(self.values)) == 1)

    def text(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.max_len}"
        if self.kind == "lognormal":
            return f"lognormal:mean={self.mean:g},max={self.max_len},sigma={self.sigma:g}"
        return f"empirical:{len(self.values)} lengths, mean {self.mean:.0f}, max {self.max_len}"

    def exact_text(self) -> str:
        """The distribution itself, which `parse` reads back equal (a placed graph's
        schedule line records it): floats as repr, empirical lengths inline."""
        if self.kind == "fixed":
            return self.text()
        if self.kind == "lognormal":
            return f"lognormal:mean={self.mean!r},max={self.max_len},sigma={self.sigma!r}"
        return "empirical:" + json.dumps(list(self.values), separators=(",", ":"))

    def capped(self, cap: int) -> "LengthDist":
        """The same distribution truncated at `cap` (a call's max_new_tokens)."""
        if cap >= self.max_len:
            return self
        if self.kind == "fixed":
            return fixed(cap)
        if self.kind == "empirical":
            return empirical(tuple(min(v, cap) for v in self.values))
        return LengthDist("lognormal", min(self.mean, cap), cap, self.sigma)

    def _ppf(self, q: np.ndarray) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(q.shape, float(self.max_len))
        if self.kind == "empirical":
            return np.quantile(np.asarray(self.values, dtype=float), q, method="inverted_cdf")
        # Log-normal with E[X] = mean: mu = ln(mean) - sigma^2 / 2; lengths past max are
        # cut off at max (the generation cap), as an RL rollout's are.
        from statistics import NormalDist

        mu = math.log(self.mean) - self.sigma ** 2 / 2
        z = np.array([NormalDist().inv_cdf(float(x)) for x in q])
        return np.exp(mu + self.sigma * z)

    def quantiles(self, n: int) -> np.ndarray:
        """n lengths at the (i + 0.5)/n quantiles, ascending (int64, in [1, max_len])."""
        q = (np.arange(n) + 0.5) / n
        return np.clip(np.rint(self._ppf(q)), 1, self.max_len).astype(np.int64)

    def draw(self, n: int, seed: int) -> np.ndarray:
        """n iid lengths (int64, in [1, max_len])."""
        rng = np.random.default_rng(seed)
        if self.kind == "fixed":
            return np.full(n, self.max_len, dtype=np.int64)
        if self.kind == "empirical":
            return rng.choice(np.asarray(self.values, dtype=np.int64), size=n)
        mu = math.log(self.mean) - self.sigma ** 2 / 2
        x = rng.lognormal(mu, self.sigma, size=n)
        return np.clip(np.rint(x), 1, self.max_len).astype(np.int64)


def fixed(n: int) -> LengthDist:
    return LengthDist("fixed", float(n), int(n))


def empirical(values: tuple[int, ...]) -> LengthDist:
    if not values:
        raise ValueError("empirical response lengths: no lengths given")
    if min(values) < 1:
        raise ValueError(f"empirical response lengths must be >= 1, got {min(values)}")
    return LengthDist("empirical", sum(values) / len(values), max(values), 0.0, tuple(values))


def _read_lengths(path: str) -> tuple[int, ...]:
    where = f"--response-lengths empirical:{path}"
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"{where}: {e.strerror}") from None
    try:
        data = json.loads(text) if text.lstrip().startswith("[") else [
            line.split()[0] for line in text.splitlines() if line.strip()
            and not line.lstrip().startswith("#")]
        return tuple(int(v) for v in data)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}: expected one integer length per line or a JSON list "
                         f"of integers ({e})") from None


def parse(text: str) -> LengthDist:
    """`fixed:N`, `lognormal:mean=M,max=X[,sigma=S]` or `empirical:FILE`."""
    kind, _, rest = text.partition(":")
    where = f"--response-lengths {text!r}"
    try:
        if kind == "fixed":
            return fixed(int(rest))
        if kind == "empirical":
            if not rest:
                raise ValueError("empirical needs a file: empirical:FILE")
            if rest.startswith("["):   # inline, as exact_text writes it
                return empirical(tuple(int(v) for v in json.loads(rest)))
            return empirical(_read_lengths(rest))
        if kind == "lognormal":
            kv = dict(p.split("=", 1) for p in rest.split(",") if p)
            bad = sorted(set(kv) - {"mean", "max", "sigma"})
            if bad or not {"mean", "max"} <= set(kv):
                raise ValueError("lognormal needs mean=M,max=X and optionally sigma=S"
                                 + (f" (unknown: {', '.join(bad)})" if bad else ""))
            sigma = float(kv.get("sigma", DEFAULT_SIGMA))
            if not sigma > 0:
                raise ValueError(f"sigma must be > 0, got {sigma:g}")
            return LengthDist("lognormal", float(kv["mean"]), int(kv["max"]), sigma)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None
    raise UsageError(f"{where}: unknown kind {kind!r} (known: fixed:N, "
                     "lognormal:mean=M,max=X[,sigma=S], empirical:FILE)")


__all__ = ["LengthDist", "KINDS", "fixed", "empirical", "parse"]
