"""Measure held-out points on a GPU and check the cost model against them.

    python benchmarks/h100_check.py --measure DIR       # on a CUDA machine

writes records in the format of benchmarks/data/calibration/h100_hf_llama.jsonl
(`env`, `hw`, `model`, `run`), for model shapes and lengths *not* in the calibration file
(a 3B and a 7B Llama, 4k-token sequences, 256-token generations), measured by the same
protocol (median of 3 timed runs after one warm-up; peak = torch.cuda.max_memory_allocated),
plus `decode` records: one decode step of a CUDA-graph-captured, static-KV-cache Llama
written here (RMSNorm, rotary, SDPA over the cache, SwiGLU, Gumbel-max sampling) at several
batch sizes and context lengths, with the bytes it must read (weights + KV cache).
DIR/h100_decode.jsonl gets the decode steps, DIR/h100_heldout.jsonl the HF runs. The
copies in benchmarks/data/ (one H100, 2026-11-26) feed the cost model: the decode steps
fit its captured-engine constants, the HF runs are held out, e.g.

    python -m graphrl.calibrate benchmarks/data/calibration/h100_hf_llama.jsonl \
        benchmarks/data/h100_decode.jsonl --check benchmarks/data/h100_heldout.jsonl

(docs/cost_model_check.md has the table).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Held-out shapes (Hugging Face LlamaConfig fields). 3b: OpenLLaMA-3B's shape; 7b:
# Llama-2-7B's shape (Touvron et al. 2023, Table 1 / the published config.json).
MODELS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8),
    "llama-3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
}
VOCAB = 32000

# (model, phase, batch, seq or prompt, new tokens): every point is outside the calibration
# file (which has 125m/350m/1b, seq <= 1024, 128 new tokens).
RUNS = [
    ("llama-1b", "forward", 2, 4096, 0),
    ("llama-1b", "train", 2, 2048, 0),
    ("llama-1b", "generate", 128, 128, 128),
    ("llama-3b", "forward", 16, 1024, 0),
    ("llama-3b", "train", 2, 1024, 0),
    ("llama-3b", "generate", 16, 256, 256),
    ("llama-7b", "forward", 4, 1024, 0),
    ("llama-7b", "forward", 16, 512, 0),
    ("llama-7b", "generate", 16, 128, 128),
]
# (model, batch, context) of the graph-captured decode steps.
DECODE = [
    ("llama-1b", 1, 512), ("llama-1b", 16, 1024), ("llama-1b", 64, 1024),
    ("llama-1b", 256, 1024), ("llama-1b", 64, 4096),
    ("llama-7b", 1, 1024), ("llama-7b", 16, 1024), ("llama-7b", 64, 1024),
    ("llama-7b", 16, 4096),
]


def _emit(out, rec: dict) -> None:
    out.write(json.dumps(rec) + "\n")
    out.flush()
    print(json.dumps(rec), flush=True)


# --------------------------------------------------------------------------------------
# Measurement (needs torch + CUDA; imported lazily so --report runs anywhere)
# --------------------------------------------------------------------------------------
def _timed(fn, torch, repeats: int = 3) -> tuple[list[float], float]:
    """Run times of `fn` after one warm-up (allocations, autotuning), and the peak GiB
    allocated during the timed runs (0 without CUDA)."""
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def _hw(torch) -> list[dict]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times, _ = _timed(lambda: a @ a, torch, 10)
    recs = [{"kind": "hw", "what": "bf16_matmul_8192",
             "tflops": 2 * 8192**3 / statistics.median(times) / 1e12}]
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times, _ = _timed(lambda: y.copy_(x), torch, 10)
    recs.append({"kind": "hw", "what": "d2d_copy_1GiB",
                 "gbps_rw": 2 * 2**30 / statistics.median(times) / 1e9})
    del a, x, y
    torch.cuda.empty_cache()
    return recs


def _model_record(name: str, shape: dict) -> dict:
    """A `model` record; its parameter count is ModelSpec's (calibrate.load checks it)."""
    from graphrl.types import ModelSpec
    spec = ModelSpec("llama", VOCAB, shape["hidden_size"], shape["num_hidden_layers"],
                     shape["num_attention_heads"], shape["num_key_value_heads"],
                     shape["intermediate_size"], 2048)
    return {"kind": "model", "model": name, "params": spec.num_params, **shape, "vocab": VOCAB}


def _hf_model(shape: dict, torch, dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, **shape)
    cfg.pad_token_id = 0
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def _phase_fn(model, phase: str, ids, new: int, torch, device: str):
    """The call the calibration protocol times for `phase` (see benchmarks/data/calibration)."""
    if phase == "forward":
        model.eval()

        def fn():
            with torch.no_grad():
                model(ids).logits
    elif phase == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device != "cpu")

        def fn():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()
        mask = torch.ones_like(ids)

        def fn():
            model.generate(ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=True, pad_token_id=0)
    return fn


def _measure_runs(out, torch, runs, models: dict, device: str) -> None:
    for name, phase, batch, seq, new in runs:
        dtype = torch.float32 if phase == "train" else torch.bfloat16
        model = _hf_model(models[name], torch, dtype, device)
        ids = torch.randint(1, VOCAB, (batch, seq), device=device)
        rec = {"kind": "run", "model": name, "phase": phase, "batch": batch, "dtype": "bf16",
               **({"prompt": seq, "new": new} if phase == "generate" else {"seq": seq})}
        try:
            times, peak = _timed(_phase_fn(model, phase, ids, new, torch, device), torch)
            rec.update(s=statistics.median(times), min=min(times), max=max(times),
                       peak_gib=peak)
        except torch.cuda.OutOfMemoryError:
            rec.update(oom=True)
        _emit(out, rec)
        del model, ids
        if device != "cpu":
            torch.cuda.empty_cache()


class _GraphDecoder:
    """One decode step of a Llama with a static KV cache, written for CUDA-graph capture:
    every shape is fixed and the position is a device tensor, so a captured graph replays
    the whole step (all layers, the head and the sampling) with one launch. It has no
    final norm (the model's other weights, all but `hidden` of them, are read)."""

    def __init__(self, torch, shape: dict, batch: int, context: int, device: str = "cuda"):
        self.t = torch
        F = torch.nn.functional
        self.F = F
        h, inter = shape["hidden_size"], shape["intermediate_size"]
        self.nh, self.nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
        self.d = h // self.nh
        layers = shape["num_hidden_layers"]
        kw = dict(device=device, dtype=torch.bfloat16)
        std = 0.02

        def w(*s):
            return torch.randn(*s, **kw) * std
        self.emb = w(VOCAB, h)
        self.head = w(VOCAB, h)
        self.layers = [dict(wqkv=w((self.nh + 2 * self.nkv) * self.d, h),
                            wo=w(h, self.nh * self.d), wgu=w(2 * inter, h),
                            wd=w(h, inter), n1=torch.ones(h, **kw), n2=torch.ones(h, **kw))
                       for _ in range(layers)]
        self.k = torch.zeros(layers, batch, self.nkv, context, self.d, **kw)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.tensor([context - 1], device=device)
        self.tokens = torch.randint(1, VOCAB, (batch,), device=device)
        inv = 1.0 / (10000 ** (torch.arange(0, self.d, 2, device=device).float() / self.d))
        self.inv_freq = inv
        self.positions = torch.arange(context, device=device)
        self.batch, self.context = batch, context
        self.weight_bytes = 2 * (self.emb.numel() + self.head.numel() + sum(
            t.numel() for layer in self.layers for t in layer.values()))
        self.kv_bytes = 2 * (self.k.numel() + self.v.numel())

    def _rms(self, x, g):
        t = self.t
        xf = x.float()
        return (xf * t.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * g

    def _rope(self, x, cos, sin):
        x1, x2 = x[..., : self.d // 2], x[..., self.d // 2:]
        return self.t.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    def step(self):
        t, F = self.t, self.F
        b = self.batch
        x = self.emb[self.tokens]                                   # [b, h]
        ang = self.pos.float()[:, None] * self.inv_freq[None]        # [1, d/2]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        mask = (self.positions <= self.pos)[None, None, None, :]     # [1,1,1,T]
        for i, p in enumerate(self.layers):
            qkv = self._rms(x, p["n1"]) @ p["wqkv"].T
            q, k, v = qkv.split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], -1)
            q = self._rope(q.view(b, self.nh, 1, self.d), cos, sin)
            k = self._rope(k.view(b, self.nkv, 1, self.d), cos, sin)
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v.view(b, self.nkv, 1, self.d))
            a = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask,
                                               enable_gqa=self.nkv != self.nh)
            x = x + a.reshape(b, self.nh * self.d) @ p["wo"].T
            g, u = (self._rms(x, p["n2"]) @ p["wgu"].T).chunk(2, -1)
            x = x + (F.silu(g) * u) @ p["wd"].T
        logits = x @ self.head.T
        gumbel = -t.log(-t.log(t.rand_like(logits, dtype=t.float32).clamp_min(1e-20)))
        self.tokens.copy_((logits.float() + gumbel).argmax(-1))


def _measure_decode(out, torch, decode, models: dict, device: str) -> None:
    for name, batch, context in decode:
        rec = {"kind": "decode", "model": name, "batch": batch, "context": context}
        try:
            dec = _GraphDecoder(torch, models[name], batch, context, device)
            eager, _ = _timed(dec.step, torch, 5)
            if device == "cpu":      # no graphs to capture: checks the step itself
                rec.update(eager_s_step=statistics.median(eager),
                           weight_bytes=dec.weight_bytes, kv_bytes=dec.kv_bytes)
                _emit(out, rec)
                continue
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    dec.step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dec.step()
            replays = 50
            times, peak = _timed(lambda: [graph.replay() for _ in range(replays)], torch, 3)
            rec.update(s_step=statistics.median(times) / replays,
                       eager_s_step=statistics.median(eager),
                       weight_bytes=dec.weight_bytes, kv_bytes=dec.kv_bytes, peak_gib=peak)
            del graph, dec
        except torch.cuda.OutOfMemoryError:
            rec.update(oom=True)
        _emit(out, rec)
        torch.cuda.empty_cache()


def measure(folder: Path, device: str = "cuda", runs=RUNS, decode=DECODE,
            models: dict = MODELS) -> None:
    """Write folder/h100_decode.jsonl (decode steps) and folder/h100_heldout.jsonl (HF
    runs), each with the env/hw/model records it needs. device="cpu" (tests) runs every
    phase and the eager decode step, without capture and without timings that mean
    anything."""
    import torch
    import transformers
    if device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("h100_check --measure: needs CUDA (torch.cuda.is_available() is False)")
    folder.mkdir(parents=True, exist_ok=True)
    header = []
    if device != "cpu":
        props = torch.cuda.get_device_properties(0)
        header.append({"kind": "env", "gpu": props.name, "mem_gib": props.total_memory / 2**30,
                       "sms": props.multi_processor_count, "torch": torch.__version__,
                       "transformers": transformers.__version__})
        header += _hw(torch)
    for filename, points, measure_points in (("h100_decode.jsonl", decode, _measure_decode),
                                             ("h100_heldout.jsonl", runs, _measure_runs)):
        with open(folder / filename, "w") as out:
            for rec in header:
                _emit(out, rec)
            for name in dict.fromkeys(point[0] for point in points):
                _emit(out, _model_record(name, models[name]))
            measure_points(out, torch, points, models, device)


def explain_generate(path: Path, device: str = "cuda", cases=(("llama-3b", 16, 256, 64),
                     ("llama-7b", 16, 128, 64), ("llama-1b", 64, 128, 64)),
                     models: dict = MODELS) -> None:
    """Where an eager HF decode step's time goes: for each (model, batch, prompt, steps),
    seconds per token step of `generate`, of a plain loop of cached model calls, and the
    profiler's device-busy time (sum of kernel durations) per step of that loop. Writes
    `explain` records to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with open(path, "w") as out:
        for name, batch, prompt, steps in cases:
            model = _hf_model(models[name], torch, torch.bfloat16, device).eval()
            ids = torch.randint(1, VOCAB, (batch, prompt), device=device)
            gen_fn = _phase_fn(model, "generate", ids, steps, torch, device)
            gen_times, _ = _timed(gen_fn, torch)

            @torch.no_grad()
            def loop(n=steps):
                out_ = model(input_ids=ids, use_cache=True)
                cache, tok = out_.past_key_values, out_.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(n - 1):
                    out_ = model(input_ids=tok, past_key_values=cache, use_cache=True)
                    cache, tok = out_.past_key_values, out_.logits[:, -1].argmax(-1,
                                                                                keepdim=True)
            loop_times, _ = _timed(loop, torch)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                                  if device != "cpu" else [])
            with profile(activities=activities) as prof:
                loop()
                if device != "cpu":
                    torch.cuda.synchronize()
            busy_us = sum(e.device_time_total for e in prof.key_averages()
                          if e.device_type.name == "CUDA")
            kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
            _emit(out, {"kind": "explain", "model": name, "batch": batch, "prompt": prompt,
                        "steps": steps,
                        "generate_s_step": statistics.median(gen_times) / steps,
                        "loop_s_step": statistics.median(loop_times) / steps,
                        "device_busy_s_step": busy_us / 1e6 / steps,
                        "kernels_per_step": kernels / steps})
            del model
            if device != "cpu":
                torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--measure", type=Path, metavar="DIR",
                      help="measure on this machine's CUDA GPU; write DIR/h100_decode.jsonl "
                           "and DIR/h100_heldout.jsonl")
    mode.add_argument("--explain-generate", type=Path, metavar="FILE.jsonl",
                      help="split eager HF decode steps into generate() overhead, model "
                           "calls and device-busy time")
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.measure)
    else:
        explain_generate(args.explain_generate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
