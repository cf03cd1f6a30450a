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
# bf16 against the fp32 HF reference (tests/test_engine_megatron.py): forward outputs
# within 2e-2 and above 0 (seen 2e-3 to 3e-3), mean loss 1e-2, the whole update's
# relative error below 0.3 (seen 0.097, as HF bf16 vs fp32; DeepSpeed's own bf16 mode
# with ZeRO-0 gave 0.33, hence autocast there: deepspeed_engine.py).
BF16_FWD, BF16_LOSS, BF16_UPDATE = 2e-2, 1e-2, 0.3


def test_deepspeed_matches_hf(tmp_path):
    from graphrl.families import TINY, save_random_checkpoint

    configs = [  # family, head, zero stage, micro-batches, offload optimizer
        ["llama", "lm", 1, 1, False],
        ["gpt2", "value", 2, 2, False],
        ["llama", "lm", 3, 2, True],
        ["gpt2", "lm", 3, 1, False],
        ["llama", "lm", 2, 2, False, "bf16"],   # DeepSpeed's bf16: bf16 module
        ["gpt2", "value", 0, 1, False, "bf16"],  # ZeRO-0: autocast over fp32 weights
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
    results = results[:len(configs)]
    for r in results:   # degrees() reports the precision each ran in: the planned one
        assert r["precision"] == (r["config"][5:] or ["fp32"])[0], r
    bf16 = [r for r in results if r["config"][5:] == ["bf16"]]
    assert [r["param_dtypes"] for r in bf16] == [["torch.bfloat16"], ["torch.float32"]]
    for r in bf16:
        assert 0 < r["forward"] < BF16_FWD and r["loss"] < BF16_LOSS, r
        assert r["update"] < BF16_UPDATE and r["layout"] == "", r
    for r in results:
        if r in bf16:
            continue
        assert r["same_names"], r
        assert r["layout"] == "", r   # local arrays = the shard-algebra layout
        assert r["forward"] < FWD, r
        assert r["loss"] < LOSS, r
        assert r["update"] < UPDATE, r
        assert r["weights"] < WEIGHTS < r["moved"], r
        if r["config"][1] == "lm":   # the entropy bonus: token entropies from HF's logits
            assert r["entropy_loss"] < LOSS and r["entropy_update"] < UPDATE, r
