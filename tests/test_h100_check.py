"""benchmarks/h100_check.py: the measurement script runs end to end (on CPU, tiny models:
no capture, timings meaningless) and writes files that graphrl.calibrate accepts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from graphrl.calibrate import load

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "h100_check.py"
TINY = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)}


def _script():
    spec = importlib.util.spec_from_file_location("h100_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_writes_both_files_on_cpu(tmp_path):
    h = _script()
    runs = [("tiny", "forward", 2, 16, 0), ("tiny", "train", 2, 16, 0),
            ("tiny", "generate", 2, 8, 4)]
    h.measure(tmp_path, device="cpu", runs=runs, decode=[("tiny", 2, 32)], models=TINY)
    held = load(tmp_path / "h100_heldout.jsonl")
    assert [(p.phase, p.batch, p.seq, p.new_tokens) for p in held.runs] == [
        ("forward", 2, 16, 0), ("train", 2, 16, 0), ("generate", 2, 8, 4)]
    assert all(p.seconds > 0 for p in held.runs)
    decode = [json.loads(line) for line in (tmp_path / "h100_decode.jsonl").read_text()
              .splitlines()]
    step = next(r for r in decode if r["kind"] == "decode")
    # weights (emb + head + layers; the step has no final norm: hidden x 2 bytes less than
    # the model) and the static cache it reads, in bf16 bytes
    spec = held.model("tiny")
    assert spec.weight_bytes - step["weight_bytes"] == 2 * 64
    # k+v, layers, batch, kv heads, context, head dim, bf16 bytes
    assert step["kv_bytes"] == 2 * 2 * 2 * 2 * 32 * 16 * 2
    assert step["eager_s_step"] > 0 and "s_step" not in step   # nothing captured on CPU


def test_measured_files_in_benchmarks_data_load():
    data = SCRIPT.parent / "data"
    decode = load(data / "h100_decode.jsonl")
    held = load(data / "h100_heldout.jsonl")
    assert len(decode.decodes) == 9 and not decode.runs
    assert {p.model for p in held.runs} == {"llama-1b", "llama-3b", "llama-7b"}


def test_explain_generate_on_cpu(tmp_path):
    h = _script()
    out = tmp_path / "explain.jsonl"
    h.explain_generate(out, device="cpu", cases=(("tiny", 2, 8, 4),), models=TINY)
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["kind"] == "explain" and rec["steps"] == 4
    assert rec["generate_s_step"] > 0 and rec["loop_s_step"] > 0
    assert rec["device_busy_s_step"] == 0       # no CUDA kernels on CPU
