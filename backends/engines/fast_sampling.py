"""On-device sampling for the fast engine, with counter-based noise.

A token is drawn by the exponential race argmax(p / E), E ~ Exp(1) i.i.d. per vocabulary
entry, which samples p exactly (the Gumbel-max trick in exponential form; see e.g.
Huijben et al. 2022, "A Review of the Gumbel-max Trick"). E comes not from a stateful
generator but from a hash of (seed, row, step, token id): the noise of a sequence's t-th
token depends only on which data row it is and t, never on which other sequences share its
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


def race_noise(seed: int, rows: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [n, vocab] (float32) for sequences `rows` [n] at their steps [n]."""
    key = fmix32((rows * 0x9E3779B1 + (seed & _MASK32)) & _MASK32)
    key = fmix32(key ^ _mul32(steps & _MASK32, 0x27D4EB2F))
    ids = torch.arange(vocab, device=rows.device, dtype=torch.int64)
    h = fmix32(key[:, None] ^ _mul32(ids, 0x165667B1)[None, :])
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))   # uniform in (0, 1)
    return -torch.log(u)


# Below this many noise values a generate call draws all its noise up front (one
# vectorised hash instead of ~40 small ops a decode step); above it, step by step.
PRECOMPUTE_LIMIT = 1 << 24


class Sampler:
    """Draws tokens for the sequences of one generate call. `first`: the data row of
    sequence 0 (noise_rows); `n` sequences of up to `max_new` tokens over `vocab`."""

    def __init__(self, *, temperature: float, top_k: int, top_p: float, seed: int,
                 first: int, n: int, max_new: int, vocab: int, device: torch.device):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed, self.first = seed, first
        self.table = None
        if temperature > 0 and n * max_new * vocab <= PRECOMPUTE_LIMIT:
            seqs = torch.arange(n, device=device).repeat_interleave(max_new)
            steps = torch.arange(max_new, device=device).repeat(n)
            self.table = race_noise(seed, seqs + first, steps, vocab).view(n, max_new, vocab)

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
        if self.table is not None:
            n, width = self.table.shape[:2]
            noise = self.table[seqs.clamp(max=n - 1), steps.clamp(max=width - 1)]
        else:
            noise = race_noise(self.seed, seqs + self.first, steps, probs.shape[-1])
        return (probs / noise).argmax(-1)
