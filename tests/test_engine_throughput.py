"""benchmarks/engine_throughput.py's CPU dry path writes records that
graphrl.engine_cost reads; the per-engine cost terms follow their formulas."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from graphrl.engine_cost import (engine_terms, load_engine_efficiency,
                                 pipeline_bubble_fraction, tp_allreduce_bytes,
                                 zero3_gather_bytes)
from graphrl.parallel import Strategy
from graphrl.types import llama2


def test_cost_terms():
    assert pipeline_bubble_fraction(1, 8) == 0
    assert pipeline_bubble_fraction(4, 8) == pytest.approx(3 / 11)
    spec = llama2("7b")
    # 4 all-reduces of [tokens, h] per layer (fwd + bwd), ring 2(t-1)/t of each
    assert tp_allreduce_bytes(spec, 1000, 4) == pytest.approx(
        32 * 4 * 1000 * 4096 * 2 * 2 * 3 / 4)
    assert tp_allreduce_bytes(spec, 1000, 1) == 0
    assert zero3_gather_bytes(8e9, 8) == pytest.approx(2 * 8e9 * 7 / 8)
    t = engine_terms(spec, 4096, Strategy(dp=2, tp=2, pp=2, micro_batches=4), "megatron",
                     efficiency={"megatron": 1.3})
    assert t["pp_bubble_fraction"] == pytest.approx(1 / 5) and t["efficiency"] == 1.3
    assert t["zero3_gather_bytes_per_gpu"] == 0


def test_dry_run_writes_what_the_cost_model_reads(tmp_path, root):
    pytest.importorskip("megatron.core")
    pytest.importorskip("deepspeed")
    out = tmp_path / "engines.jsonl"
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "engine_throughput.py"),
                          "--dry", "--out", str(out)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["engine"] for r in recs] == ["hf", "megatron", "deepspeed"]
    assert all(r["tokens_per_s"] > 0 and r["kind"] == "engine" for r in recs)
    eff = load_engine_efficiency(out)
    assert eff["hf"] == 1.0 and set(eff) == {"hf", "megatron", "deepspeed"}
