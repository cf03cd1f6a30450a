"""bf16 vs fp32: seconds of one train step and one forward on each engine that runs in
one process (hf, fast), side by side in one run, for two model sizes.

    OMP_NUM_THREADS=1 python benchmarks/precision_step.py [--repeats 20] [--device cpu]
        [--sizes tiny,3m] [--engines hf,fast]

Sizes: tiny (vocab 16, hidden 64, 2 layers, 4 heads, intermediate 128) over 16 rows x 24
tokens; 3m (vocab 512, hidden 256, intermediate 512, 4 layers, 4 heads: ~3M parameters)
over 64 rows x (6 prompt + 64 response) tokens. Prints per size, engine and precision
the median seconds of a PPO train step (one minibatch) and of a forward (log-probs), and
the bf16 / fp32 ratio (docs/precision.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# (vocab, hidden, layers, heads, kv heads, intermediate, max positions), rows, prompt, new
SIZES = {"tiny": ((16, 64, 2, 4, 4, 128, 64), 16, 0, 24),
         "3m": ((512, 256, 4, 4, 4, 512, 128), 64, 6, 64)}


def measure(size: str, engine: str, precision: str, repeats: int,
            device: str) -> dict[str, float]:
    import torch

    import graphrl as gr
    from graphrl.backends.engines.registry import create_engine

    shape, rows, prompt, new = SIZES[size]
    spec = gr.ModelSpec("llama", *shape, "lm", dtype=precision)
    eng = create_engine(engine, gr.ModelDecl("policy", spec, "policy", True, engine), {},
                        device, 0)
    g = torch.Generator().manual_seed(0)
    t = prompt + new
    tokens = torch.randint(0, shape[0], (rows, t), generator=g)
    mask = torch.ones(rows, t)
    response = mask.clone()
    response[:, :prompt] = 0
    roll = {"tokens": tokens, "attention_mask": mask, "response_mask": response}
    lp = eng.forward(roll)["logprobs"]
    inputs = {"rollout": roll, "old_logprobs": {"logprobs": lp},
              "advantages": {"advantages": torch.randn(rows, t, generator=g)}}
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
    p.add_argument("--sizes", default="tiny,3m")
    p.add_argument("--engines", default="hf,fast")
    a = p.parse_args()
    for size in a.sizes.split(","):
        for engine in a.engines.split(","):
            r = {prec: measure(size, engine, prec, a.repeats, a.device)
                 for prec in ("fp32", "bf16")}
            for what in ("train", "forward"):
                print(f"{size:5s} {engine:5s} {what:8s} fp32 {r['fp32'][what] * 1e3:8.2f} ms  "
                      f"bf16 {r['bf16'][what] * 1e3:8.2f} ms  "
                      f"bf16/fp32 {r['bf16'][what] / r['fp32'][what]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
