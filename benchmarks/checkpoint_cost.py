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
3. Sharded on Ray (1x4xcpu, 4 fake GPUs): examples/ppo.py with the policy trained by
   megatron-core (tp 2 x pp 2) and the critic by DeepSpeed ZeRO-2 (dp 4) on the same 4
   ranks, a checkpoint after every iteration (each rank writes its shard; the runner's
   `checkpoints: N written, X s each`); the previous checkpoint verified (every sha256)
   and loaded by an executor on megatron dp 2 (ZeRO-1) + DeepSpeed ZeRO-3 dp 2 (every
   rank puts the shards together and takes its part). For scale, the same on HF
   engines (FSDP2 policy, replicated critic: full tensors from each engine's first
   rank). `--no-ray` skips them, `--only-ray` runs only them.

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


SHARDED = {"policy.train": {"gpus": "0-3", "tp": 2, "pp": 2, "engine": "megatron"},
           "critic.train": {"gpus": "0-3", "dp": 4, "zero": 2, "engine": "deepspeed"}}
OTHER = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 1, "engine": "megatron"},
         "policy.generate": {"gpus": "2-3"},
         "critic.train": {"gpus": "2-3", "dp": 2, "zero": 3, "engine": "deepspeed"}}
# the same run on HF engines (FSDP2 policy, replicated critic): full-tensor files
HF = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3, "engine": "hf"},
      "policy.generate": {"gpus": "2-3"},
      "critic.train": {"gpus": "2-3", "dp": 2, "zero": 0, "engine": "hf"}}


def ray_cost(steps: int, written: dict, resumed: dict) -> dict[str, float]:
    """A Ray run on placement `written` with a checkpoint after every iteration; then
    the last checkpoint verified, and loaded by an executor on placement `resumed`."""
    import json

    import graphrl as gr
    from graphrl import checkpoint_run as ckr
    from graphrl.launch import start_executor
    from graphrl.checkpoint import published
    from graphrl.example_file import load_example
    from graphrl.runner import run_experiment

    build = load_example(str(ROOT / "examples" / "ppo.py"))
    with tempfile.TemporaryDirectory() as d:
        for name, placement in (("written", written), ("resumed", resumed)):
            Path(d, f"{name}.json").write_text(json.dumps(placement))
        ray = dict(quiet=True, backend="ray", cluster="1x4xcpu", call_timeout=300.0)
        opts = gr.RunOptions(iterations=steps, checkpoint_dir=f"{d}/ckpt", checkpoint_every=1,
                             keep=2, placement=f"{d}/written.json", **ray)
        exp = dataclasses.replace(build(opts), prepare=None)
        out = io.StringIO()
        s = run_experiment(exp, opts, out=out)
        line = next(x for x in out.getvalue().splitlines() if "checkpoints:" in x)
        ckpt_s = float(line.split(",")[-1].split()[0])
        earlier = published(Path(d, "ckpt"))[-2]
        size = sum(f.stat().st_size for f in earlier.rglob("*") if f.is_file())
        resume = gr.RunOptions(iterations=steps, resume=str(earlier),
                               placement=f"{d}/resumed.json", **ray)
        program = exp.program()
        t0 = time.perf_counter()
        ck = ckr.open_resume(resume, exp, program)   # verified: every sha256
        verify_s = time.perf_counter() - t0
        ex = start_executor(program, resume)
        try:
            t0 = time.perf_counter()
            ckr.restore(ck, ex)
            load_s = time.perf_counter() - t0
        finally:
            ex.close()
    step_s = sum(r["step_seconds"] for r in s.rows) / len(s.rows)
    return {"step_s": step_s, "ckpt_s": ckpt_s, "verify_s": verify_s, "load_s": load_s,
            "mb": size / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-ray", action="store_true", help="skip the sharded Ray run")
    p.add_argument("--only-ray", action="store_true", help="only the sharded Ray run")
    a = p.parse_args()
    import torch

    if not a.no_ray:
        rows = (("megatron tp2 x pp2 + DeepSpeed ZeRO-2 dp4 (sharded) -> megatron dp2 "
                 "ZeRO-1 + DeepSpeed ZeRO-3 dp2", SHARDED, OTHER),
                ("HF: FSDP2 dp2 + replicas dp2 (full tensors) -> the same", HF, HF))
        print("| Ray 1x4xcpu, examples/ppo.py | checkpoint size | write (s) | verify (s) | "
              "load (s) | step (s) | write / step |")
        print("|---|---|---|---|---|---|---|")
        for name, written, resumed in rows:
            c = ray_cost(a.steps, written, resumed)
            print(f"| {name} | {c['mb']:.1f} MiB | {c['ckpt_s']:.3f} | {c['verify_s']:.3f} | "
                  f"{c['load_s']:.3f} | {c['step_s']:.3f} | {c['ckpt_s'] / c['step_s']:.2f} |",
                  flush=True)
        print()
    if a.only_ray:
        return
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
