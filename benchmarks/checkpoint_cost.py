"""What a checkpoint costs: seconds to write one (state gathered, files written and
fsynced, checksums, manifest, rename) and to verify and load one, beside the step time.

1. examples/ppo.py at its default size (4 tiny models, batch 64) on the local backend:
   `--steps` iterations with a checkpoint after every one (graphrl.runner, the same path
   as `graphrl run --checkpoint-dir D --checkpoint-every 1`); the reward-model
   pre-training is skipped (it changes nothing a checkpoint writes).
2. A ~110M-parameter Llama (hidden 768, 12 layers, vocab 16000) as one HFEngine on CPU,
   after one AdamW step (so the checkpoint holds weights + two moments): one checkpoint
   written and one verified + loaded, through graphrl.checkpoint; one optimizer step on
   4 x 64 tokens is timed for scale.

    python benchmarks/checkpoint_cost.py            # prints a Markdown table
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "examples"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def ppo_cost(steps: int) -> dict[str, float]:
    import graphrl as gr
    from graphrl.example_file import load_example
    from graphrl.runner import run_experiment

    build = load_example(str(ROOT / "examples" / "ppo.py"))
    with tempfile.TemporaryDirectory() as d:
        opts = gr.RunOptions(iterations=steps, quiet=True, checkpoint_dir=d,
                             checkpoint_every=1, keep=1)
        exp = dataclasses.replace(build(opts), prepare=None)
        out = io.StringIO()
        s = run_experiment(exp, opts, out=out)
        line = next(x for x in out.getvalue().splitlines() if "checkpoints:" in x)
        ckpt_s = float(line.split(",")[-1].split()[0])
        size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
        from graphrl.backends.local import LocalExecutor
        from graphrl.checkpoint import find_checkpoint

        ex = LocalExecutor(exp.program(), seed=0)
        t0 = time.perf_counter()
        ex.load_state(find_checkpoint(d))
        load_s = time.perf_counter() - t0
    step_s = sum(r["step_seconds"] for r in s.rows) / len(s.rows)
    return {"step_s": step_s, "ckpt_s": ckpt_s, "load_s": load_s, "mb": size / 2**20}


def big_cost() -> dict[str, float]:
    import torch

    import graphrl as gr
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.checkpoint import CheckpointWriter, find_checkpoint, save_torch

    cfg = dict(model_type="llama", vocab_size=16000, hidden_size=768, intermediate_size=2048,
               num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
               max_position_embeddings=128)
    decl = gr.Model("policy", cfg, role="policy", trainable=True).decl()
    engine = HFEngine(decl, {}, seed=0)
    params = sum(p.numel() for p in engine.module.parameters())
    tokens = torch.randint(0, 16000, (4, 64))
    t0 = time.perf_counter()
    opt = engine._optimizer()
    with torch.enable_grad():
        loss = engine.module(input_ids=tokens, labels=tokens).loss
        loss.backward()
    opt.step()
    step_s = time.perf_counter() - t0
    engine.version = 1
    with tempfile.TemporaryDirectory() as d:
        writer = CheckpointWriter(d, keep=1)
        t0 = time.perf_counter()
        tmp = writer.begin(1)
        save_torch(engine.state_dict(), tmp / "models" / "policy.pt")
        writer.publish(tmp, 1, {"step": "bench"})
        ckpt_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
        t0 = time.perf_counter()
        ck = find_checkpoint(d)
        verify_s = time.perf_counter() - t0
        from graphrl.checkpoint import load_torch

        t0 = time.perf_counter()
        engine.load_state_dict(load_torch(ck.file("models/policy.pt")))
        load_s = time.perf_counter() - t0
    return {"params_m": params / 1e6, "step_s": step_s, "ckpt_s": ckpt_s,
            "verify_s": verify_s, "load_s": load_s, "mb": size / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    import torch

    ppo, big = ppo_cost(a.steps), big_cost()
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| model | checkpoint size | write (s) | verify + load (s) | step (s) | "
          "write / step |")
    print("|---|---|---|---|---|---|")
    print(f"| examples/ppo.py (4 models, batch 64) | {ppo['mb']:.1f} MiB | "
          f"{ppo['ckpt_s']:.3f} | {ppo['load_s']:.3f} | {ppo['step_s']:.3f} (PPO step) | "
          f"{ppo['ckpt_s'] / ppo['step_s']:.2f} |")
    print(f"| Llama {big['params_m']:.0f}M params + AdamW | {big['mb']:.0f} MiB | "
          f"{big['ckpt_s']:.2f} | {big['verify_s'] + big['load_s']:.2f} | "
          f"{big['step_s']:.2f} (one AdamW step, 4x64 tokens) | "
          f"{big['ckpt_s'] / big['step_s']:.2f} |")


if __name__ == "__main__":
    main()
