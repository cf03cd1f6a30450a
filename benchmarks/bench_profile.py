"""Where a training step's time goes: torch.profiler over a few steps of a workload.

Prints the wall time, the share of it inside torch operators (self time, forward and
backward), the share in matrix multiplications (aten::mm/addmm/bmm/baddbmm and the
fused attention kernel), the rest (Python: graphrl's executor, Hugging Face module code,
op dispatch), and the top operators by self time. Used by benchmarks/vs_trl.py
--profile (docs/vs_trl.md).
"""
from __future__ import annotations

import time
from typing import Any, Callable

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
           "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_steps(run: Callable[[int], Any], threads: int, steps: int = 4,
                  top: int = 15) -> dict[str, float]:
    """Run `run(steps)` once to warm up, then again under torch.profiler; print and
    return the shares (of the profiled wall time, which includes engine set-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    run(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        result = run(steps)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    self_us = {e.key: e.self_cpu_time_total for e in events}
    ops = sum(self_us.values()) / 1e6
    mm = sum(v for k, v in self_us.items() if k in MATMULS) / 1e6
    step_times = result["times"] if isinstance(result, dict) else []
    out = {"wall_s": wall, "ops_s": ops, "matmul_s": mm,
           "matmul_share": mm / wall, "ops_share": ops / wall}
    print(f"profiled {steps} steps: wall {wall:.3f} s (steps: "
          + ", ".join(f"{t:.3f}" for t in step_times) + ")")
    print(f"  matmul seconds per step: {mm / steps:.3f} (set-up included)")
    print(f"  inside torch operators {ops:.3f} s ({100 * ops / wall:.0f}%), of which "
          f"matmuls {mm:.3f} s ({100 * mm / wall:.0f}% of wall); "
          f"outside operators (Python, dispatch) {wall - ops:.3f} s "
          f"({100 * (wall - ops) / wall:.0f}%)")
    print(f"  top {top} operators by self time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"    {e.key:<58} {e.count:>7} calls {e.self_cpu_time_total / 1e6:8.3f} s "
              f"{100 * e.self_cpu_time_total / 1e6 / wall:5.1f}%")
    return out


__all__ = ["profile_steps"]
