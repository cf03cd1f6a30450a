"""Per-engine cost terms: what choosing megatron-core, DeepSpeed or HF changes in a
training call's cost (kept apart from graphrl/cost.py, which already prices the same
mechanisms in seconds: `pp_bubble`, `tp_comm`, `dp_comm` of its breakdowns).

- Pipeline bubble of the 1F1B / GPipe schedule: (p - 1) / (m + p - 1) of the step is idle
  per stage (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM", §2.2.1: bubble time (p-1)·(t_f+t_b) over an ideal m·(t_f+t_b)).
- Tensor-parallel all-reduce traffic: 2 all-reduces of the [tokens, hidden] activations
  per layer in forward and 2 in backward (Shoeybi et al. 2019, §3, Fig. 4); a ring
  all-reduce moves 2 (t - 1) / t of the buffer per GPU (Patarasuk & Yuan 2009). Sequence
  parallelism replaces each by an all-gather + reduce-scatter of the same volume
  (Korthikanti et al. 2022, §4.2.2).
- ZeRO-3 gather traffic: the weights all-gathered before forward and again before
  backward, (d - 1) / d of them per GPU each time (Rajbhandari et al. 2020, §7.2.2).
- Engine efficiency: measured tokens/s of an engine over the HF engine's on the same
  shape (benchmarks/engine_throughput.py records); 1.0 where nothing was measured.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Mapping

ENGINE_EFFICIENCY_FILE = "benchmarks/data/engine_throughput.jsonl"


def pipeline_bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B / GPipe step with `pp` stages and `micro_batches`."""
    if pp < 1 or micro_batches < 1:
        raise ValueError(f"pp {pp} and micro-batches {micro_batches} must be >= 1")
    return (pp - 1) / (micro_batches + pp - 1)


def tp_allreduce_bytes(spec: Any, tokens: int, tp: int, dtype_bytes: int = 2,
                       train: bool = True) -> float:
    """Bytes each GPU sends for tensor parallelism in one pass over `tokens` tokens
    (per pipeline stage holding all `spec.num_layers` layers; divide by pp per stage)."""
    if tp <= 1:
        return 0.0
    per_layer = (4 if train else 2) * tokens * spec.hidden_size * dtype_bytes
    return spec.num_layers * per_layer * 2 * (tp - 1) / tp


def zero3_gather_bytes(weight_bytes: float, dp: int, train: bool = True) -> float:
    """Bytes each GPU receives gathering ZeRO-3-partitioned weights for one step."""
    if dp <= 1:
        return 0.0
    return (2 if train else 1) * weight_bytes * (dp - 1) / dp


def engine_terms(spec: Any, tokens: int, strategy: Any, engine: str,
                 dtype_bytes: int = 2,
                 efficiency: Mapping[str, float] | None = None) -> dict[str, float]:
    """The per-engine terms of a training call under `strategy` on `engine`."""
    weight_bytes = spec.num_params * dtype_bytes / (strategy.tp * strategy.pp)
    return {
        "pp_bubble_fraction": pipeline_bubble_fraction(strategy.pp, strategy.micro_batches),
        "tp_bytes_per_gpu": tp_allreduce_bytes(spec, tokens // max(strategy.dp, 1),
                                               strategy.tp, dtype_bytes) / strategy.pp,
        "zero3_gather_bytes_per_gpu": (zero3_gather_bytes(weight_bytes, strategy.dp)
                                       if strategy.zero == 3 else 0.0),
        "efficiency": (efficiency or {}).get(engine, 1.0),
    }


def load_engine_efficiency(path: str | Path = ENGINE_EFFICIENCY_FILE) -> dict[str, float]:
    """engine -> median over shapes of (its tokens/s) / (HF's tokens/s) on that shape,
    from benchmarks/engine_throughput.py records; {} when the file does not exist."""
    p = Path(path)
    if not p.exists():
        return {}
    by_shape: dict[tuple, dict[str, float]] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not JSON: {e.msg}") from None
        if r.get("kind") != "engine":
            continue
        key = (r["model"], r["batch"], r["seq"], r["device"])
        by_shape.setdefault(key, {})[r["engine"]] = float(r["tokens_per_s"])
    ratios: dict[str, list[float]] = {}
    for runs in by_shape.values():
        if "hf" not in runs:
            continue
        for engine, tps in runs.items():
            ratios.setdefault(engine, []).append(tps / runs["hf"])
    return {e: statistics.median(v) for e, v in ratios.items()}


__all__ = ["pipeline_bubble_fraction", "tp_allreduce_bytes", "zero3_gather_bytes",
           "engine_terms", "load_engine_efficiency", "ENGINE_EFFICIENCY_FILE"]
