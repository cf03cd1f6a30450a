"""megatron-core engine: HF<->megatron conversion is exact; TP, SP, PP (1F1B,
micro-batches), TP x PP and ZeRO-1 match a one-process HF engine (engine_diff.py)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from engine_diff import run, tiny_decl  # noqa: E402

# Tolerances (float32, CPU). Forward outputs: 1e-5 (seen <= 5e-7). Mean loss over
# the steps: 1e-4 (seen <= 7e-5). After 4 AdamW steps at lr 1e-2 (weights move ~4e-2):
# the whole update's relative error ||w - w_ref|| / ||w_ref - w_0|| below 5e-3 (seen
# <= 8e-4; a wrong gradient gives O(1)), and every single weight within 1e-2 (Adam turns
# float noise in a zero gradient, e.g. an embedding row of masked tokens, into an
# lr-sized step of either sign: seen <= 6e-3).
FWD, LOSS, UPDATE, WEIGHTS = 1e-5, 1e-4, 5e-3, 1e-2
# bf16 (autocast over fp32 masters) against the fp32 HF reference: forward outputs within
# 2e-2 and above 0 (seen 2.3e-3, as HF's own bf16 vs fp32; 0 would mean no bf16 ran),
# mean loss 1e-2 (seen 6e-4), the whole update's relative error below 0.3 (seen 0.08-0.10,
# HF bf16 vs fp32: 0.097; a wrong gradient gives O(1)).
BF16_FWD, BF16_LOSS, BF16_UPDATE = 2e-2, 1e-2, 0.3


@pytest.mark.parametrize("family,head,tp,pp", [
    ("llama", "lm", 2, 2), ("gpt2", "value", 2, 2), ("llama", "score", 1, 2),
    ("gpt2", "lm", 2, 1)])
def test_conversion_round_trip_is_exact(family, head, tp, pp):
    from graphrl.backends.engines.hf import build_module
    from graphrl.backends.engines.megatron_convert import from_megatron, to_megatron

    decl = tiny_decl(family, head)
    torch.manual_seed(0)
    hf = build_module(decl).state_dict()
    shards = {(s, t): to_megatron(hf, decl.spec, tp=tp, tp_rank=t, pp=pp, pp_rank=s)
              for s in range(pp) for t in range(tp)}
    back = from_megatron(shards, decl.spec, tp, pp, order=list(hf))
    assert list(back) == list(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


def test_fused_layouts_follow_megatron():
    """linear_qkv interleaves q/k/v per query group; linear_fc1 holds [gate_r; up_r]."""
    from graphrl.backends.engines.megatron_convert import to_megatron

    decl = tiny_decl("llama", "lm")   # 4 heads, 2 kv heads, d_head 16
    hf = {k: torch.arange(v.numel(), dtype=torch.float32).view(v.shape) + i * 1e5
          for i, (k, v) in enumerate(_meta_state(decl).items())}
    p = "model.layers.1."
    m = to_megatron(hf, decl.spec, tp=2, tp_rank=1)
    qkv = m["decoder.layers.1.self_attention.linear_qkv.weight"]   # rank 1: group 1
    q, k, v = (hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(qkv, torch.cat([q[32:64], k[16:32], v[16:32]]))
    fc1 = m["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf[p + "mlp.gate_proj.weight"][64:],
                                       hf[p + "mlp.up_proj.weight"][64:]]))
    assert torch.equal(m["decoder.layers.1.self_attention.linear_proj.weight"],
                       hf[p + "self_attn.o_proj.weight"][:, 32:])


def _meta_state(decl):
    from graphrl.backends.engines.hf import build_module

    with torch.device("meta"):
        return build_module(decl).state_dict()


def test_megatron_matches_hf(tmp_path):
    configs = [  # family, head, dp, tp, pp, sequence parallel, micro-batches, zero
        ["llama", "lm", 1, 2, 1, True, 1, 0],     # TP=2, SP on
        ["llama", "lm", 1, 1, 2, False, 2, 0],    # PP=2, 1F1B over 2 micro-batches
        ["llama", "lm", 1, 2, 2, True, 2, 0],     # TP2 x PP2 on 4 ranks
        ["gpt2", "lm", 1, 2, 2, False, 2, 0],     # GPT-2, tied embeddings across stages
        ["gpt2", "value", 2, 2, 1, True, 1, 1],   # value head, dp 2 x tp 2, ZeRO-1
        ["llama", "score", 4, 1, 1, False, 1, 1],  # score head, pairwise loss, ZeRO-1
        ["llama", "lm", 1, 2, 2, True, 2, 0, "bf16"],  # bf16: TP2 x PP2, SP, 1F1B
    ]
    results = run("megatron", 4, configs, str(tmp_path / "megatron.json"))
    assert [r["config"] for r in results] == configs
    for r in results:   # degrees() reports the precision each ran in: the planned one
        assert r["precision"] == (r["config"][8:] or ["fp32"])[0], r
    bf16 = [r for r in results if r["config"][8:] == ["bf16"]]
    for r in bf16:   # bf16 compute over fp32 master weights and fp32 AdamW state
        assert r["param_dtypes"] == r["state_dtypes"] == ["torch.float32"], r
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
        # a train in two parts (graphrl/stream_train.py) updates as the whole batch does
        assert r["parts_update"] < UPDATE and r["parts_loss"] < LOSS, r


def test_every_family_matches_hf_at_tp2_and_pp2(family_dirs, tmp_path):
    """Each family's random checkpoint (graphrl.families: biases, q/k norms, head_dim,
    llama3 rope, GPT-2; and Llama with attention_bias, with mlp_bias) on megatron at tp=2
    (sequence parallel), at pp=2 (1F1B, 2 micro-batches) and on one rank: log-probs equal
    Hugging Face's own module's, and training steps the HF engine's; every rank's local
    arrays are what the shard catalog says (biases and norms included). One spawn of 2
    ranks for all of it."""
    from graphrl.families import TINY

    families = list(TINY) + ["llama2_attention_bias", "llama2_mlp_bias"]
    configs = [[f, family_dirs[f], tp, pp, sp, mb] for tp, pp, sp, mb in
               ((2, 1, True, 1), (1, 2, False, 2), (1, 1, False, 1)) for f in families]
    results = run("families", 2, configs, str(tmp_path / "families.json"), timeout_s=480)
    assert [r["config"] for r in results] == [[f, tp, pp] for f, _, tp, pp, _, _ in configs]
    for r in results:
        assert r["same_names"], r
        assert r["layout"] == "", r
        assert r["hf_module"] < FWD and r["forward"] < FWD, r
        assert r["loss"] < LOSS, r
        # the key biases' gradient is 0 but for rounding (engine_diff._drop_key_bias)
        assert r["update_no_key_bias"] < UPDATE, r
        assert r["weights_no_key_bias"] < WEIGHTS < r["moved"], r


@pytest.mark.parametrize("family,change,feature", [
    ("mistral", {"sliding_window": 8}, "sliding_window=8"),
    ("llama2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                    "factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_type=yarn"),
    ("llama2", {"hidden_act": "gelu"}, "activation=gelu")])
def test_features_megatron_lacks_are_refused(family, change, feature, tmp_path):
    """A checkpoint asking for what megatron does not implement is refused when the
    engine is built, naming the model, the engine and the feature (never ignored)."""
    from graphrl.backends.engines.megatron import MegatronEngine
    from graphrl.errors import UsageError
    from graphrl.families import save_random_checkpoint, tiny_config

    from engine_diff import family_decl

    d = str(save_random_checkpoint({**tiny_config(family), **change}, tmp_path / family))
    with pytest.raises(UsageError, match=rf"model m: engine megatron .*{feature}"):
        MegatronEngine(family_decl(d), {"checkpoint": d}, ranks=[0], rank=0,
                       groups={"pp": None})


def test_unsupported_strategy_is_refused_before_launch():
    """A pinned engine that cannot run the planned strategy, and a strategy no engine
    runs, fail at compile time naming the call, the strategy and the engines that can."""
    from graphrl.cli.compile import cluster_of
    from graphrl.compiler import compile_graph
    from graphrl.errors import UsageError

    graph = _ppo_graph()
    cluster = cluster_of("1x4xcpu")
    bad = {"policy.train": {"gpus": "0-3", "tp": 2, "pp": 2, "engine": "deepspeed"}}
    with pytest.raises(UsageError, match=r"call policy.train .*engine deepspeed cannot run "
                                         r"its strategy dp=1,tp=2,pp=2.*engines that can: "
                                         r"megatron"):
        compile_graph(graph, cluster, placement=bad, engines=True)
    none = {"policy.train": {"gpus": "0-3", "tp": 2, "dp": 2, "zero": 3}}
    with pytest.raises(UsageError, match=r"call policy.train .*zero=3.*no engine here can "
                                         r"run it"):
        compile_graph(graph, cluster, placement=none, engines=True)
    ok = {"policy.train": {"gpus": "0-3", "tp": 2, "pp": 2, "engine": "megatron"},
          "critic.train": {"gpus": "0-3", "dp": 4, "zero": 2, "engine": "deepspeed"}}
    plan = compile_graph(graph, cluster, placement=ok, engines=True).plan
    from graphrl.engines import resolve_engines

    chosen = {n.call: e for n, e in ((plan.graph.node(k), v)
                                     for k, v in resolve_engines(plan.graph).items())}
    assert chosen["policy.train"] == chosen["policy.forward"] == "megatron"
    assert chosen["critic.train"] == "deepspeed" and chosen["policy.generate"] == "hf"


def _ppo_graph():
    from test_ray_executor import ppo_experiment

    return ppo_experiment().program().graph
