"""CUDA-graph replay of the fast engine's decode step, one graph per batch bucket.

A decode step of b slots runs in the graph of the smallest bucket (a power of two) that
holds b, over the whole cache length, reading the pending tokens and positions from
static input buffers and writing logits to a static output (PyTorch CUDA graphs,
torch.cuda.CUDAGraph; capture after warm-up on a side stream as PyTorch's documentation
prescribes). Weights and the KV cache are the model's persistent buffers, refreshed in
place, so a captured graph stays valid across training steps. CUDA only.
"""
from __future__ import annotations

from typing import Any

import torch

from graphrl.errors import UsageError


def bucket(b: int, slots: int) -> int:
    """The smallest power of two >= b, capped at the slot count."""
    size = 1
    while size < b:
        size *= 2
    return min(size, slots)


class GraphDecoder:
    def __init__(self, lm: Any):
        if lm.device.type != "cuda":
            raise UsageError(f"engine fast: CUDA graphs need a CUDA device, the model is on "
                             f"{lm.device}")
        self.lm = lm
        self.tok = torch.zeros(lm.slots, dtype=torch.long, device=lm.device)
        self.pos = torch.zeros(lm.slots, dtype=torch.long, device=lm.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        lm = self.lm
        side = torch.cuda.Stream(device=lm.device)
        side.wait_stream(torch.cuda.current_stream(lm.device))
        with torch.cuda.stream(side):
            for _ in range(2):   # warm-up: allocator and kernel selection
                lm.decode(self.tok[:size], self.pos[:size], lm.max_len)
        torch.cuda.current_stream(lm.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = lm.decode(self.tok[:size], self.pos[:size], lm.max_len)
        self.pool = graph.pool()
        return graph, logits

    def decode(self, tok: torch.Tensor, pos: torch.Tensor, b: int) -> torch.Tensor:
        """Logits [b, V] of one decode step of slots 0..b-1 (as FastLM.decode). Slots
        b..size-1 of the bucket hold free slots at position 0: their writes land in free
        cache rows, which a later prefill overwrites."""
        size = bucket(b, self.lm.slots)
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, logits = self.graphs[size]
        self.tok[:size].copy_(tok[:size])
        self.pos[:size].copy_(pos[:size])
        graph.replay()
        return logits[:b]
