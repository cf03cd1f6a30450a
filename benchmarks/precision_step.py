"""bf16 vs fp32: seconds of one train step and one forward of a tiny model on each
engine that runs in one process (hf, fast), side by side in one run.

    python benchmarks/precision_step.py [--repeats 20] [--device cpu]

Prints per engine and precision the median seconds of a PPO train step (one minibatch)
and of a forward (log-probs) over a batch of 16 x 24 tokens, and the bf16 / fp32 ratio.
On CPU bf16 autocast adds casts that a model this small does not win back; the ratio
says how much (docs/precision.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(engine: str, precision: str, repeats: int, device: str) -> dict[str, float]:
    import torch

    import graphrl as gr
    from graphrl.backends.engines.base import create_engine

    spec = gr.ModelSpec("llama", 16, 64, 2, 4, 4, 128, 64, "lm", dtype=precision)
    eng = create_engine(engine, gr.ModelDecl("policy", spec, "policy", True, engine), {},
                        device, 0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (16, 24), generator=g)
    mask = torch.ones(16, 24)
    roll = {"tokens": tokens, "attention_mask": mask, "response_mask": mask}
    lp = eng.forward(roll)["logprobs"]
    inputs = {"rollout": roll, "old_logprobs": {"logprobs": lp},
              "advantages": {"advantages": torch.randn(16, 24, generator=g)}}
    out = {}
    for what, fn in (("train", lambda: eng.train(inputs, loss="ppo", seed=0)),
                     ("forward", lambda: eng.forward(roll))):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[what] = statistics.median(times)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    for engine in ("hf", "fast"):
        r = {prec: measure(engine, prec, a.repeats, a.device) for prec in ("fp32", "bf16")}
        for what in ("train", "forward"):
            print(f"{engine:5s} {what:8s} fp32 {r['fp32'][what] * 1e3:7.2f} ms  "
                  f"bf16 {r['bf16'][what] * 1e3:7.2f} ms  "
                  f"bf16/fp32 {r['bf16'][what] / r['fp32'][what]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
