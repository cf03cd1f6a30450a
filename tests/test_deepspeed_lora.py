"""LoRA on the DeepSpeed engine (ZeRO 0-3) against the HF LoRA engine, which runs peft
(tests/ds_lora_diff.py, two spawned gloo ranks, one spawn for every case), and planned:
a LoRA policy pinned to deepspeed compiles with an adapter-only weight sync."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("peft")

from test_engine_deepspeed import (BF16_FWD, BF16_LOSS, BF16_UPDATE, FWD, LOSS,  # noqa: E402
                                   UPDATE, WEIGHTS)

FP32 = [  # zero stage, model, LoRA targets (q_proj,v_proj or all 7), precision, micro-batches
    [1, "llama", "qv", "fp32", 1, "offload"],   # ZeRO-Offload: the adapters' Adam on CPU
    [2, "llama", "qv", "fp32", 2],
    [3, "llama", "qv", "fp32", 2],
    [3, "qwen2", "all", "fp32", 1],   # Qwen2: q/k/v biases; every linear adapted
]
BF16 = [   # the HF LoRA engine's bf16: autocast over the bf16 base and fp32 adapters
    [3, "llama", "qv", "bf16", 2],
    [0, "llama", "qv", "bf16", 1],
]
DP = 2
# the merged export W + (alpha / r) B A against peft's module of the fp32 reference: in
# fp32 float noise (seen <= 2.4e-7); in bf16 the base's rounding (seen 6.3e-3)
MERGED, BF16_MERGED = 1e-6, 2e-2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from ds_lora_diff import run

    got = run(FP32 + BF16 + ["checkpoint"], str(tmp_path_factory.mktemp("ds_lora")),
              world=DP, timeout_s=600.0)   # a loaded shared machine: a minute or more
    assert [r.get("config") for r in got[:-1]] == FP32 + BF16
    return {"fp32": got[:len(FP32)], "bf16": got[len(FP32):-1], "checkpoint": got[-1]}


def test_adapters_and_logprobs_equal_the_hf_lora_engine(results):
    """fp32, ZeRO 1 (optimizer offload), 2, 3 (and a Qwen2 with all seven targets):
    log-probs, losses and
    the adapters after 4 AdamW steps equal peft's on the HF engine within the tolerances
    of the full-model DeepSpeed tests; the base does not move by one bit."""
    for r in results["fp32"]:
        assert r["same_names"] and r["layout"] == "", r
        assert r["forward"] < FWD and r["loss"] < LOSS, r
        assert r["update"] < UPDATE, r
        assert r["weights"] < WEIGHTS < r["moved"], r
        assert r["base_unchanged"] and r["adapters_moved"] > 1e-2, r
        assert r["precision"] == "fp32" and r["export_dtypes"] == ["torch.float32"], r
        assert r["forward_same_precision"] == 0.0, r


def test_only_the_adapters_are_in_deepspeeds_optimizer(results):
    """DeepSpeed's optimizer groups hold the adapters and nothing else; its Adam state
    on a rank is the adapters' 1/dp share under ZeRO 1-3, all of them under ZeRO-0."""
    for r in results["fp32"] + results["bf16"]:
        assert r["optimized"] == r["adapter_names"], r["config"]
        assert all(".lora_A." in n or ".lora_B." in n for n in r["optimized"])
        share = r["adapter_numel"] // (DP if r["config"][0] else 1)
        assert r["state_numel"] == share, r["config"]
        assert r["adapter_numel"] * 20 < r["base_numel"] or r["config"][1] == "qwen2"
        assert r["state_dtypes"] == ["torch.float32"], r["config"]


def test_bf16_holds_a_bf16_base_and_fp32_adapters(results):
    """bf16: the frozen base held in bf16 (ZeRO-3: partitioned bf16), the adapters and
    their Adam state fp32; log-probs before training bit-equal to the bf16 HF LoRA
    engine's; after training close to the fp32 reference as the full-model bf16
    DeepSpeed tests are (seen: update 0.106, as HF bf16 vs fp32)."""
    for r in results["bf16"]:
        assert r["precision"] == "bf16" and r["frozen_dtypes"] == ["torch.bfloat16"], r
        assert r["export_dtypes"] == ["torch.float32"] and r["layout"] == "", r
        assert r["forward_same_precision"] == 0.0, r
        assert 0 < r["forward"] < BF16_FWD and r["loss"] < BF16_LOSS, r
        assert r["update"] < BF16_UPDATE and r["base_unchanged"], r
        assert r["merged_names"] and r["merged"] < BF16_MERGED, r


def test_merged_export_is_the_peft_merge(results):
    """merged_weights (what a decode copy or --save-merged reads): the plain HF names,
    each target W + (alpha / r) B A, equal to lora_hf.merged_weights of peft's module."""
    for r in results["fp32"]:
        assert r["merged_names"] and r["merged"] < MERGED, r


def test_the_shared_base_is_the_base(results):
    """lora_hf.SharedBase over the DeepSpeed engine (a reference that is the policy's
    base): after training, its forward is bit-identical to the engine's own before
    training (B = 0) and equals a plain HF engine of the base; its export is the base."""
    for r in results["fp32"]:
        assert r["shared_is_untrained"] and r["shared_forward"] < FWD, r
        assert r["trained_vs_base"] > 1e-2, r   # the adapters are off, not absent
        assert r["shared_export_names"] and r["shared_export"] == 0.0, r
    for r in results["bf16"]:
        assert r["shared_is_untrained"] and r["shared_forward"] < BF16_FWD, r
        assert r["shared_export"] == 0.0, r   # the fp32 base rounded once to bf16


def test_save_of_a_zero3_policy_is_a_peft_adapter_that_peft_loads(results):
    """--save of a ZeRO-3 LoRA policy (partitioned weights gathered, rank 0 writes):
    peft's PeftModel.from_pretrained on the saved base gives the engine's log-probs."""
    r = next(r for r in results["fp32"] if r["config"][:4] == [3, "llama", "qv", "fp32"])
    assert {"adapter_config.json", "adapter_model.safetensors", "base"} <= set(
        r["saved_files"]), r["saved_files"]
    assert r["saved_adapter"] < FWD, r["saved_adapter"]


def test_checkpoints_hold_adapters_and_their_adam_state(results):
    """ZeRO-2 ranks write their shards (the frozen base by rank 0, the adapters' fp32
    fragments and moments by their owners); the same placement resumes bit-exact; ZeRO-3
    loads and rewrites the state unchanged and agrees; so does the HF LoRA engine."""
    r = results["checkpoint"]
    assert r["version"] == 1 and r["same_exact"] and r["rewritten"] == "", r
    assert r["other"] < 1e-3 and r["hf"] < 1e-3, r
    assert r["files"] == ["rank0.pt", "index.json"], r


def test_a_deepspeed_lora_policy_compiles_with_adapter_sync():
    """70B PPO with LoRA on the policy, its train pinned to deepspeed: the plan trains
    and scores it on DeepSpeed (ZeRO), runs the reference (its shared base) on the same
    engine and GPUs, and syncs the adapters only."""
    import graphrl as gr
    from conftest import load_build
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph

    graph = load_build("ppo")(gr.RunOptions(model_size="70b",
                                            lora=("policy:r=16",))).program().graph
    plan = compile_graph(graph, ClusterSpec.parse("1x8xH100"), "auto",
                         placement={"policy.train": {"engine": "deepspeed"}}).plan
    g = plan.graph
    calls = {n.call: n for n in g.calls()}
    train, ref = calls["policy.train"], calls["reference.forward"]
    assert train.placement.strategy.engine == "deepspeed", train.placement
    assert ref.placement == train.placement
    spec = g.model("policy").spec
    reshards = [n for n in g.nodes if n.target == "reshard" and n.model == "policy"]
    assert reshards
    for n in reshards:
        assert n.attr("sync") == "adapters"
        assert n.attr("network_bytes") <= 2 * spec.sync_bytes * train.placement.mesh.size
