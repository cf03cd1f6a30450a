"""On-device sampling for the fast engine, with counter-based noise.

A token is drawn by inversion: one uniform u per draw, the token is the first whose
cumulative probability exceeds u times the total (the inverse-CDF method, e.g. Devroye
1986, "Non-Uniform Random Variate Generation", ch. 2), which samples p exactly with one
random number per token instead of one per vocabulary entry. u comes not from a stateful
generator but from a hash of (seed, row, step): the noise of a sequence's t-th token
depends only on which data row it is and t, never on which other sequences share its
batch or slot. So continuous batching, slot reuse and data-parallel splits
(`noise_rows`) all sample exactly what one-at-a-time generation would. The hash is
MurmurHash3's 32-bit finaliser (Appleby 2008), computed in int64 without overflow.
"""
from __future__ import annotations

import torch

from .hf import filter_probs

_MASK32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h in [0, 2^32): split h in 16-bit halves so no int64 product
    overflows."""
    lo = (h & 0xFFFF) * c
    hi = ((h >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser: a bijective avalanche mix of 32-bit values (int64 tensor)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniforms(seed: int, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float64 [n] for sequences `rows` [n] at their steps [n] (24 bits)."""
    key = fmix32((rows * 0x9E3779B1 + (seed & _MASK32)) & _MASK32)
    h = fmix32(key ^ _mul32(steps & _MASK32, 0x27D4EB2F))
    return ((h >> 8).to(torch.float64) + 0.5) * (1.0 / (1 << 24))


class Sampler:
    """Draws tokens for the sequences of one generate call. `first`: the data row of
    sequence 0 (noise_rows); `n` sequences of up to `max_new` tokens over `vocab`."""

    def __init__(self, *, temperature: float, top_k: int, top_p: float, seed: int,
                 first: int, n: int, max_new: int, vocab: int, device: torch.device):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed, self.first = seed, first
        self.table = None
        if temperature > 0:   # every draw's uniform up front: n x max_new numbers
            seqs = torch.arange(n, device=device).repeat_interleave(max_new)
            steps = torch.arange(max_new, device=device).repeat(n)
            self.table = uniforms(seed, seqs + first, steps).view(n, max_new)

    def __call__(self, logits: torch.Tensor, seqs: torch.Tensor,
                 steps: torch.Tensor) -> torch.Tensor:
        """One token per row of logits [b, V] (sequence seqs[i] at response step steps[i]):
        greedy at temperature 0, else a draw from softmax(logits / temperature) after
        top-k / top-p (nucleus) filtering. Rows of seqs outside 0..n-1 (free slots) get
        some token, never used."""
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_k or self.top_p < 1.0:
            probs = filter_probs(probs, self.top_k, self.top_p)
        n, width = self.table.shape
        u = self.table[seqs.clamp(max=n - 1), steps.clamp(max=width - 1)]
        cdf = probs.cumsum(-1, dtype=torch.float64)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        # u * total can round up to the total: take the last token of non-zero mass
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
        return torch.minimum(tok, last)
