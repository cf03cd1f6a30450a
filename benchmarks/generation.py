"""Generation throughput: the fast engine vs Hugging Face `generate` vs graphrl's HF
engine loop, on the same random Llama (built in code), batch, prompt and response
lengths. Runs are interleaved (A B C A B C ...) and the median of each is reported, so
load from other processes on a shared machine hits all three alike.

    .venv/bin/python benchmarks/generation.py --out docs/generation.json
    .venv/bin/python benchmarks/generation.py --device cuda --gpu-check   # on a GPU

`--gpu-check` (CUDA only): ms per decode step of the fast engine (CUDA graphs) for a
1B-parameter Llama shape at batch 64, against the HBM bound: the bytes of weights plus KV
cache read per step divided by the copy bandwidth measured on the device.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # name -> vocab, hidden, layers, heads
    "tiny": (16, 64, 2, 4),
    "3M": (512, 256, 4, 4),
}


def decl(vocab: int, hidden: int, layers: int, heads: int, context: int = 512):
    import graphrl as gr

    spec = gr.ModelSpec("llama", vocab, hidden, layers, heads, heads, 2 * hidden, context, "lm")
    return gr.ModelDecl("policy", spec, "policy", True)


def engines(size: str, device: str):
    from graphrl.backends.engines.fast import FastEngine
    from graphrl.backends.engines.hf import HFEngine

    d = decl(*SIZES[size])
    hf = HFEngine(d, {}, device=device, seed=0)
    fast = FastEngine(d, {}, device=device, seed=0)
    fast.load_weights(hf.export_weights())
    return hf, fast


def hf_generate(hf, prompts, new_tokens: int):
    """transformers' own sampling loop (`generate`, do_sample, its default cache)."""
    ids = prompts["tokens"].to(hf.device)
    return hf.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=True, top_k=0, temperature=1.0, pad_token_id=0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(size: str, batch: int, prompt_len: int, new_tokens: int, reps: int,
            device: str) -> dict:
    hf, fast = engines(size, device)
    vocab = SIZES[size][0]
    prompts = {"tokens": torch.randint(0, vocab, (batch, prompt_len),
                                       generator=torch.Generator().manual_seed(0))}
    runs = {
        "fast": lambda: fast.generate(prompts, max_new_tokens=new_tokens, seed=1),
        "hf_generate": lambda: hf_generate(hf, prompts, new_tokens),
        "graphrl_hf_loop": lambda: hf.generate(prompts, max_new_tokens=new_tokens, seed=1),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():   # warm-up
            fn()
        for _ in range(reps):
            for name, fn in runs.items():
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t)
    tokens = batch * new_tokens
    row = {"size": size, "params": sum(p.numel() for p in hf.module.parameters()),
           "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}
    for name, ts in times.items():
        row[f"{name}_tok_s"] = round(tokens / statistics.median(ts), 1)
    row["fast_vs_hf_generate"] = round(row["fast_tok_s"] / row["hf_generate_tok_s"], 2)
    row["fast_vs_graphrl_loop"] = round(row["fast_tok_s"] / row["graphrl_hf_loop_tok_s"], 2)
    return row


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted once each)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * nbytes * 10 / (time.perf_counter() - t)


def gpu_check(device: str, batch: int = 64, context: int = 512, steps: int = 64) -> dict:
    """ms per decode step of a 1B Llama shape (hidden 2048, 16 layers, 32 heads, 8 kv
    heads, ffn 8192, vocab 32000; bf16) vs the HBM bound."""
    import graphrl as gr
    from graphrl.backends.engines.fast import FastEngine

    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit("--gpu-check needs --device cuda on a machine with CUDA")
    spec = gr.ModelSpec("llama", 32000, 2048, 16, 32, 8, 8192, 2048, "lm")
    eng = FastEngine(gr.ModelDecl("p", spec, "policy", False), {}, device=device, seed=0)
    eng.module.to(torch.bfloat16)
    prompts = {"tokens": torch.randint(0, 32000, (batch, context - steps))}
    eng.generate(prompts, max_new_tokens=8, seed=0, stop_at_eos=False)   # capture graphs
    sync(device)
    t = time.perf_counter()
    eng.generate(prompts, max_new_tokens=steps, seed=0, stop_at_eos=False)
    sync(device)
    total = time.perf_counter() - t
    t = time.perf_counter()
    eng.generate(prompts, max_new_tokens=1, seed=0, stop_at_eos=False)   # prefill only
    sync(device)
    prefill = time.perf_counter() - t
    step_s = (total - prefill) / (steps - 1)
    weights = sum(p.numel() * p.element_size() for p in eng.module.parameters())
    kv = 2 * spec.num_layers * batch * (context - steps / 2) * spec.num_kv_heads * \
        (spec.hidden_size // spec.num_heads) * 2
    bw = copy_bandwidth(device)
    bound = (weights + kv) / bw
    return {"decode_step_ms": round(step_s * 1e3, 3), "hbm_bound_ms": round(bound * 1e3, 3),
            "ratio_to_bound": round(step_s / bound, 2), "copy_bandwidth_GBps": round(bw / 1e9),
            "batch": batch, "context": context}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--gpu-check", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for size in a.sizes:
        for n in a.new_tokens:
            rows.append(measure(size, a.batch, a.prompt_len, n, a.reps, a.device))
            print(json.dumps(rows[-1]), flush=True)
    result = {"device": a.device, "threads": a.threads, "rows": rows}
    if a.gpu_check:
        result["gpu_check"] = gpu_check(a.device)
        print(json.dumps(result["gpu_check"]))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
