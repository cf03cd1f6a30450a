"""Training throughput of graphrl's engines side by side on one GPU: HF (plain AdamW),
megatron-core (MegatronEngine, tp = pp = 1) and DeepSpeed (ZeRO-1) on 1B and 3B Llama
shapes; tokens/s and MFU per engine, as records the cost model reads
(graphrl.engine_cost.load_engine_efficiency):

    python benchmarks/engine_throughput.py --out benchmarks/data/engine_throughput.jsonl
    python benchmarks/engine_throughput.py --dry --out /tmp/e.jsonl   # CPU, tiny shape

Each record: {"kind": "engine", "engine", "model", "params", "batch", "seq", "steps",
"seconds", "tokens_per_s", "mfu", "peak_flops", "device", "dtype"}. Protocol: every engine
trains the same seeded model on the same random tokens with the PPO loss; one warm-up
step, then the median of `--steps` timed optimizer steps (CUDA synchronised). Weights are
float32 as the engines keep them; on CUDA the step runs under bf16 autocast. MFU =
6 N tokens/s (N: matmul parameters; + attention 12 L h s, Korthikanti et al. 2022) / peak bf16 FLOP/s.
No GPU was lent when this was written: only the --dry path has run (tests/
test_engine_throughput.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Llama-3.2-1B and -3B shapes (the published config.json files), vocab cut to 32000.
SHAPES = {
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192),
    "llama-3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, ffn=8192),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense, vendor sheets


def spec_of(name: str, seq: int):
    from graphrl.types import ModelSpec

    s = SHAPES[name]
    vocab = 32 if name == "tiny" else 32000
    return ModelSpec("llama", vocab, s["hidden"], s["layers"], s["heads"], s["kv_heads"],
                     s["ffn"], max(seq, 64), "lm")


def build(engine: str, decl, device: str, groups: dict):
    opts = {"lr": 1e-5}
    if engine == "hf":
        from graphrl.backends.engines.hf import HFEngine

        return HFEngine(decl, opts, device=device)
    if engine == "megatron":
        from graphrl.backends.engines.megatron import MegatronEngine

        return MegatronEngine(decl, opts, ranks=[0], rank=0, groups=groups, device=device)
    from graphrl.backends.engines.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(decl, opts, ranks=[0], rank=0, group=groups["dp"],
                           self_group=groups["tp"], zero=1, device=device)


def batch(spec, rows: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, spec.vocab_size, (rows, seq), generator=g)
    mask = torch.zeros(rows, seq)
    mask[:, seq // 2:] = 1
    return {"rollout": {"tokens": toks, "attention_mask": torch.ones(rows, seq),
                        "response_mask": mask},
            "old_logprobs": {"logprobs": torch.zeros(rows, seq)},
            "advantages": {"advantages": torch.randn(rows, seq, generator=g)}}


def measure(engine: str, name: str, rows: int, seq: int, steps: int, device: str,
            groups: dict) -> dict:
    import torch

    from graphrl.graph import ModelDecl

    spec = spec_of(name, seq)
    eng = build(engine, ModelDecl("policy", spec, "policy", True), device, groups)
    data = batch(spec, rows, seq)
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    times = []
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            eng.train(data, loss="ppo", seed=i)
        if cuda:
            torch.cuda.synchronize()
        if i:   # the first step warms up
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    tokens = rows * seq
    from graphrl.cost import matmul_params

    flops = 6 * matmul_params(spec) * tokens + 12 * spec.num_layers * spec.hidden_size * seq * tokens
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    return {"kind": "engine", "engine": engine, "model": name, "params": spec.num_params,
            "batch": rows, "seq": seq, "steps": steps, "seconds": sec,
            "tokens_per_s": tokens / sec, "mfu": (flops / sec / peak) if peak else None,
            "peak_flops": peak, "device": gpu, "dtype": "fp32 weights, bf16 autocast"
            if cuda else "fp32"}


def groups_of_one() -> dict:
    """A one-rank world and the groups the engines ask for (all of them this rank)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    dist.init_process_group("gloo", rank=0, world_size=1)
    world = dist.group.WORLD
    return {k: world for k in ("tp", "pp", "dp", "embd", "cp", "mesh")}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSONL file to write (appended)")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shape, 1 timed step")
    p.add_argument("--models", default="llama-1b,llama-3b")
    p.add_argument("--engines", default="hf,megatron,deepspeed")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    if a.dry:
        models, device, rows, seq, steps = ["tiny"], "cpu", 2, 16, 1
    else:
        if not _cuda():
            p.error("needs CUDA (use --dry on CPU)")
        models, device, rows, seq, steps = (a.models.split(","), "cuda", a.batch, a.seq,
                                            a.steps)
    groups = groups_of_one()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in models:
        for engine in a.engines.split(","):
            rec = measure(engine, name, rows, seq, steps, device, groups)
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            mfu = f"{rec['mfu']:.1%}" if rec["mfu"] is not None else "-"
            print(f"{name:<9} {engine:<10} {rec['tokens_per_s']:12.1f} tokens/s  MFU {mfu}",
                  flush=True)
            if device == "cuda":
                import torch

                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
