"""DeepSpeed engine: ZeRO 1/2/3 (and optimizer offload) match a one-process HF engine
(engine_diff.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from engine_diff import run  # noqa: E402

# Tolerances (float32, CPU). Forward outputs: 1e-5 (seen <= 0). Mean loss over
# the steps: 1e-4 (seen <= 7e-5). After 4 AdamW steps at lr 1e-2 (weights move ~4e-2):
# the whole update's relative error ||w - w_ref|| / ||w_ref - w_0|| below 5e-3 (seen
# <= 8e-4; a wrong gradient gives O(1)), and every single weight within 1e-2 (Adam turns
# float noise in a zero gradient, e.g. an embedding row of masked tokens, into an
# lr-sized step of either sign: seen <= 6e-3).
FWD, LOSS, UPDATE, WEIGHTS = 1e-5, 1e-4, 5e-3, 1e-2


def test_deepspeed_matches_hf(tmp_path):
    from graphrl.families import TINY, save_random_checkpoint

    configs = [  # family, head, zero stage, micro-batches, offload optimizer
        ["llama", "lm", 1, 1, False],
        ["gpt2", "value", 2, 2, False],
        ["llama", "lm", 3, 2, True],
        ["gpt2", "lm", 3, 1, False],
    ]
    # and (in the same spawn: each costs seconds) ZeRO-3 on checkpoints of the families
    # whose weights differ in kind (tests/test_model_families.py checks hf on all six):
    # qwen2 biases, qwen3 q/k norm + head_dim, llama3 rope scaling; their log-probs also
    # against HF's own module
    families = [[f, str(save_random_checkpoint(TINY[f], tmp_path / f, seed=i))]
                for i, f in enumerate(["qwen2", "qwen3", "llama3"])]
    results = run("deepspeed", 2, configs + families, str(tmp_path / "deepspeed.json"),
                  timeout_s=600.0)   # a loaded shared machine: minutes
    assert [r["config"] for r in results] == configs + families
    for r in results[len(configs):]:
        assert r["hf_module"] < FWD, r
    for r in results:
        assert r["same_names"], r
        assert r["layout"] == "", r   # local arrays = the shard-algebra layout
        assert r["forward"] < FWD, r
        assert r["loss"] < LOSS, r
        assert r["update"] < UPDATE, r
        assert r["weights"] < WEIGHTS < r["moved"], r
