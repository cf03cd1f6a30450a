"""Sharded checkpoints of the megatron-core and DeepSpeed engines (two gloo ranks;
tests/ckpt_engines.py): each rank writes its shard; the same placement resumes bit for
bit; another placement (megatron tp 2 -> dp 2 with ZeRO-1, DeepSpeed ZeRO-2 -> ZeRO-3)
and a one-process HF engine resume within float tolerance; a reloaded state written
again on the other placement is identical (weights, Adam moments, step)."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("deepspeed")

from ckpt_engines import run_checkpoints  # noqa: E402

# One AdamW step at lr 1e-2 from the same state moves weights by ~1e-2 (a lost or wrong
# moment or step count changes it by that much); engines that sum gradients in another
# order differ by float noise (seen: megatron 3e-7, DeepSpeed 1.3e-5).
TOL = 1e-3


def test_sharded_engine_checkpoints_resume_on_any_placement(tmp_path):
    r = run_checkpoints(str(tmp_path / "ckpt"), str(tmp_path / "out.json"))
    for engine in ("megatron", "deepspeed"):
        got = r[engine]
        assert got["version"] == 1, got
        assert got["same_exact"], got
        assert got["rewritten"] == "", got
        assert got["other"] < TOL and got["hf"] < TOL, got
    # rank 0 wrote its own shard and the index (rank 1 its own shard)
    assert r["megatron"]["files"] == r["deepspeed"]["files"] == ["rank0.pt", "index.json"]
