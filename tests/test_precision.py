"""A model's precision (bf16 mixed precision by default, or fp32) is declared, planned,
priced and executed as planned (docs/engines.md "Precision", docs/precision.md).
The sharded engines' bf16 runs are in tests/test_engine_megatron.py and
tests/test_engine_deepspeed.py (their differential harness)."""
from __future__ import annotations

import dataclasses

import pytest

import graphrl as gr
from graphrl.parallel import Strategy
from graphrl.types import llama2

# bf16 vs fp32 outputs of one engine on the same weights (tiny random models, CPU): the
# largest log-prob / value difference seen is ~3e-3 (bf16 keeps 8 mantissa bits: a
# relative rounding of 2^-9 ~ 2e-3 per operation); the bound leaves room, and a
# difference of exactly 0 would mean the engine did not compute in bf16 at all.
BF16_FWD = 2e-2


# -- declared and planned ------------------------------------------------------------------
def _ppo(**opts):
    from conftest import load_build

    return load_build("ppo")(gr.RunOptions(**opts))


def test_precision_prints_parses_and_defaults_to_bf16():
    from graphrl.parser import parse_graph

    default = _ppo().program().graph
    assert all(m.spec.dtype == "bf16" for m in default.models)
    assert "dtype=fp32" not in default.text()
    g = _ppo(precision="policy=fp32").program().graph
    assert g.model("policy").spec.dtype == "fp32" and g.model("critic").spec.dtype == "bf16"
    assert "dtype=fp32" in g.text() and parse_graph(g.text()) == g
    # fp32 weights are 4 bytes: the policy's weight values carry twice the bytes
    w = {m.name: m.spec.weight_bytes for m in g.models}
    assert w["policy"] == 2 * default.model("policy").spec.weight_bytes
    every = _ppo(precision="fp32").program().graph
    assert {m.spec.dtype for m in every.models} == {"fp32"}


def test_bad_precision_is_a_clear_error():
    with pytest.raises(gr.UsageError, match=r"model policy: unknown precision 'fp16' "
                                            r"\(allowed: bf16, fp32\)"):
        gr.Model("policy", {}, role="policy", precision="fp16")
    with pytest.raises(gr.UsageError, match=r"--precision critic=f32: unknown precision "
                                            r"'f32' for critic \(allowed: bf16, fp32\)"):
        _ppo(precision="critic=f32")
    with pytest.raises(gr.UsageError, match=r"--precision: ppo_step has no model 'critc'"):
        _ppo(precision="critc=fp32")


def test_cli_flag_reaches_the_printed_graph(capsys, root):
    from graphrl.cli import main

    assert main(["show", str(root / "examples" / "grpo.py"), "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "dtype=fp32" in out and "dtype=bf16" not in out


def test_memory_model_prices_the_bytes_each_precision_keeps():
    from graphrl.compute_cost import kv_cache_bytes
    from graphrl.memory_cost import (activation_bytes_per_layer, forward_memory,
                                     host_state_bytes, model_state_bytes)

    bf16 = llama2("7b")
    fp32 = dataclasses.replace(bf16, dtype="fp32")
    n = bf16.num_params
    # no sharding: 2 + 2 + 12 and 4 + 4 + 8 bytes per parameter
    assert model_state_bytes(bf16, Strategy()) == model_state_bytes(fp32, Strategy()) == 16 * n
    # ZeRO over 8 ranks: bf16 shards 12/14/16 bytes, fp32 8/12/16
    for zero, (b, f) in {1: (4 + 12 / 8, 8 + 8 / 8), 2: (2 + 14 / 8, 4 + 12 / 8),
                         3: (16 / 8, 16 / 8)}.items():
        s = Strategy(dp=8, zero=zero)
        assert model_state_bytes(bf16, s) == pytest.approx(b * n)
        assert model_state_bytes(fp32, s) == pytest.approx(f * n)
    # optimizer offload keeps the optimizer states on the host: 12 vs 8 bytes
    off = Strategy(dp=8, zero=1, offload=1)
    assert host_state_bytes(bf16, off) == pytest.approx(12 * n / 8)
    assert host_state_bytes(fp32, off) == pytest.approx(8 * n / 8)
    assert model_state_bytes(fp32, off) == pytest.approx(8 * n)
    # a frozen model holds its weights only; activations and KV cache scale 2 -> 4 bytes
    assert bf16.weight_bytes == 2 * n and fp32.weight_bytes == 4 * n
    assert forward_memory(fp32, 1, 1) - forward_memory(bf16, 1, 1) == pytest.approx(
        2 * n, rel=1e-3)
    assert kv_cache_bytes(fp32, 4, 128) == 2 * kv_cache_bytes(bf16, 4, 128)
    assert activation_bytes_per_layer(fp32, 4, 128) == 2 * activation_bytes_per_layer(
        bf16, 4, 128)


def test_fp32_compute_is_priced_at_the_fp32_peak():
    from graphrl.cluster import H100_80G
    from graphrl.compute_cost import _device_forward
    from graphrl.cost_params import CALIBRATED

    bf16 = llama2("7b")
    fp32 = dataclasses.replace(bf16, dtype="fp32")
    cb, hb = _device_forward(bf16, 8, 512, Strategy(), H100_80G, CALIBRATED)
    cf, hf = _device_forward(fp32, 8, 512, Strategy(), H100_80G, CALIBRATED)
    assert cf / cb == pytest.approx(H100_80G.peak_bf16_flops / 67e12)   # datasheet FP32
    assert hf == pytest.approx(2 * hb)                                 # 4-byte weights
    assert H100_80G.peak_flops("fp32") == 67e12


# -- executed ------------------------------------------------------------------------------
def _decl(precision, head="lm", trainable=True, engine="hf"):
    spec = gr.ModelSpec("llama", 16, 32, 2, 2, 2, 64, 32, head, dtype=precision)
    return gr.ModelDecl("m", spec, "policy", trainable, engine)


def _rollout():
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (4, 10), generator=g)
    mask = torch.ones(4, 10)
    mask[1, :3] = 0
    return {"tokens": tokens, "attention_mask": mask, "response_mask": mask}


def _gap(a, b, roll):
    """Largest |a - b| at outputs read at a real position from a real one (left padding
    leaves the others unused: attention over nothing but padding)."""
    import torch

    att = roll["attention_mask"]
    keep = (att * torch.nn.functional.pad(att[:, :-1], (1, 0))) > 0
    if a.dim() == 1:
        keep = torch.ones_like(a, dtype=torch.bool)
    return float((a - b)[keep].abs().max())


def _engine(decl):
    from graphrl.backends.engines.registry import create_engine

    return create_engine(decl.engine, decl, {}, "cpu", 0)


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_bf16_trains_on_fp32_masters_and_frozen_models_hold_bf16(engine):
    import torch

    roll = _rollout()
    e32, e16 = _engine(_decl("fp32", engine=engine)), _engine(_decl("bf16", engine=engine))
    lp32, lp16 = e32.forward(roll)["logprobs"], e16.forward(roll)["logprobs"]
    assert lp16.dtype == torch.float32   # log-softmax in fp32
    assert 0 < _gap(lp16, lp32, roll) < BF16_FWD
    assert (e16.ran_precision(), e32.ran_precision()) == ("bf16", "fp32")
    inputs = {"rollout": roll, "old_logprobs": {"logprobs": lp16},
              "advantages": {"advantages": torch.randn(4, 10)}}
    e16.train(inputs, loss="ppo", seed=0)
    assert {p.dtype for p in e16.module.parameters()} == {torch.float32}   # masters
    assert {p.grad.dtype for p in e16.module.parameters() if p.grad is not None} == {
        torch.float32}
    state = [v for s in e16.optimizer.state.values() for v in s.values() if v.dim()]
    assert state and {v.dtype for v in state} == {torch.float32}
    frozen = _engine(_decl("bf16", trainable=False, engine=engine))
    assert {p.dtype for p in frozen.module.parameters()} == {torch.bfloat16}   # no fp32 copy
    assert frozen.ran_precision() == "bf16"
    assert 0 < _gap(frozen.forward(roll)["logprobs"], lp32, roll) < BF16_FWD


def test_fast_engine_decodes_on_a_bf16_copy_and_cache():
    import torch

    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        fast = _engine(_decl(precision, engine="fast"))
        out = fast.generate({"tokens": torch.randint(0, 16, (3, 4))}, max_new_tokens=4)
        assert out["tokens"].shape == (3, 8)
        assert fast._lm.dtype == fast._lm.k.dtype == fast._lm.w["head"].dtype == dtype
        assert {p.dtype for p in fast.module.parameters()} == {torch.float32}


def test_hf_generates_as_its_generation_copy():
    """A trainable bf16 hf model generates on its weights rounded to bf16, as the copy a
    reshard fills on the Ray backend (a frozen engine, bf16-held) does: the same logits
    at every step, bit for bit, so a run samples the same tokens whether generation has
    a copy of its own or not. (Autocast over the fp32 masters gave other logits and, at a
    near tie, another sampled token: tests/test_ray_adaptive_kl.py's local run drifted
    from its Ray run.) The masters, their optimizer state and the buffers come back
    untouched."""
    import torch

    roll = _rollout()
    trained = _engine(_decl("bf16"))
    inputs = {"rollout": roll, "old_logprobs": trained.forward(roll),
              "advantages": {"advantages": torch.randn(4, 10)}}
    trained.train(inputs, loss="ppo", seed=0)   # masters off the bf16 grid, Adam state
    copy = _engine(_decl("bf16", trainable=False))
    copy.load_weights(trained.export_weights())
    before = {k: v.clone() for k, v in trained.module.state_dict().items()}
    buffers = {k: v.clone() for k, v in trained.module.named_buffers()}
    assert buffers and {v.dtype for v in buffers.values()} == {torch.float32}
    logits: dict[str, list] = {"trained": [], "copy": []}
    for name, eng in (("trained", trained), ("copy", copy)):
        eng.module.register_forward_hook(
            lambda m, a, out, got=logits[name]: got.append(out.logits.float().clone()))
    prompts = {"tokens": roll["tokens"][:, :4], "attention_mask": roll["attention_mask"][:, :4]}
    kw = dict(max_new_tokens=6, temperature=1.0, samples=2, seed=3)
    out = trained.generate(prompts, **kw)
    assert torch.equal(out["tokens"], copy.generate(prompts, **kw)["tokens"])
    assert len(logits["trained"]) == len(logits["copy"]) == 6
    for a, b in zip(logits["trained"], logits["copy"]):
        assert torch.equal(a, b)
    after = trained.module.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v)
               for k, v in before.items())
    assert all(torch.equal(b, buffers[k]) and b.dtype == torch.float32
               for k, b in trained.module.named_buffers())
    params = list(trained.module.parameters())
    assert all(p is q for p, q in zip(trained.optimizer.param_groups[0]["params"], params))
    assert trained.ran_precision() == "bf16"


@pytest.mark.parametrize("head,field", [("value", "values"), ("score", "score")])
def test_scalar_heads_return_fp32_in_bf16(head, field):
    import torch

    roll = _rollout()
    a = _engine(_decl("fp32", head))
    for trainable in (True, False):
        b = _engine(_decl("bf16", head, trainable))
        out = b.forward(roll)[field]
        assert out.dtype == torch.float32
        assert 0 < _gap(out, a.forward(roll)[field], roll) < BF16_FWD


def test_a_frozen_model_trained_in_set_up_is_held_in_bf16_again():
    import torch

    from graphrl.backends.local import LocalExecutor

    exp = _ppo()
    ex = LocalExecutor(exp.program(), seed=0)
    reward = ex.engines["reward"]
    assert {p.dtype for p in reward.module.parameters()} == {torch.bfloat16}

    def fit(engines):
        pairs = {"chosen": {"tokens": torch.full((8, 6), 12)},
                 "rejected": {"tokens": torch.full((8, 6), 3)}}
        engines["reward"].train(pairs, loss="bradley_terry", seed=0)
        return {"dtypes": float(len({p.dtype for p in reward.module.parameters()}))}

    ex.prepare(fit)
    assert {p.dtype for p in reward.module.parameters()} == {torch.bfloat16}
    assert reward.optimizer is None


def test_bf16_on_a_device_without_it_is_refused_before_launch(monkeypatch):
    from graphrl.backends.engines import precision
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.runner import make_executor

    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    with pytest.raises(gr.UsageError, match=r"model m: planned in bf16 mixed precision, but "
                                            r"device cpu cannot compute in bf16 .*"
                                            r"--precision fp32"):
        HFEngine(_decl("bf16"), {})
    HFEngine(_decl("fp32"), {})   # fp32 is the way out
    exp = _ppo()
    with pytest.raises(gr.UsageError, match=r"model policy: planned in bf16.*"
                                            r"--precision policy=fp32"):
        make_executor(exp.program(), gr.RunOptions())


def test_ray_runs_bf16_as_planned_and_reports_it(shared_ray):
    """A bf16 run on Ray: FSDP2 training (MixedPrecisionPolicy), generation on its own
    bf16 copy, frozen models in bf16; every call's ranks report precision=bf16."""
    pytest.importorskip("ray")
    import io

    from conftest import load_build
    from graphrl.backends.ray.executor import RayExecutor
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph
    from graphrl.runner import run_experiment

    exp = dataclasses.replace(load_build("grpo")(gr.RunOptions(batch_size=4, seed=0)),
                              prepare=None)
    plan = compile_graph(exp.program().graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement={"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3},
                                    "policy.generate": {"gpus": "2-3"}}, engines=True).plan
    shared_ray.session()
    ex = RayExecutor(exp.program(), plan, seed=0, timeout_s=120.0,
                     env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        run_experiment(exp, gr.RunOptions(iterations=1, seed=0, batch_size=4, quiet=True),
                       out=io.StringIO(), executor=ex)
        engines = ex.call_engines()
    finally:
        ex.close()
    train = engines["policy.train"]
    assert (train["engine"], train["dp"], train["zero"]) == ("hf", 2, 3), engines   # FSDP2
    assert all(e["precision"] == "bf16" and e["differs"] == [] for e in engines.values()), \
        engines


# fused bf16 (fast_forward, no autocast; attention in fp32 on CPU) vs HF bf16 autocast on
# the same fp32 weights, on _decl's tiny model: measured max |Δ log-prob| 9.8e-4 (fused vs
# fp32 7.6e-4, HF vs fp32 7.2e-4), gradient relative error (||g_fused - g_hf|| / ||g_hf||,
# all parameters) 3.1e-3, fused vs fp32 4.0e-3 where HF autocast vs fp32 is 4.0e-3.
# Bounds leave 3-5x room.
BF16_FUSED_VS_AUTOCAST = 5e-3
BF16_GRAD_REL = 1e-2


def test_fast_engine_runs_bf16_through_its_fused_kernels():
    """A bf16 model on the fast engine scores and trains through fast_forward in bf16 mixed
    precision: log-probs and gradients as HF's bf16 autocast gives them, within bf16
    rounding; fp32 masters and .grad; a frozen model on its held bf16 weights."""
    import torch
    import torch.nn.functional as F

    roll = _rollout()
    e32 = _engine(_decl("fp32", engine="fast"))
    e16, h16 = _engine(_decl("bf16", engine="fast")), _engine(_decl("bf16"))
    for e in (e16, h16):
        e.load_weights(e32.export_weights())
    assert e16.fused_forward and e16.ran_precision() == "bf16"
    lp32, lp16, lph = (e.forward(roll)["logprobs"] for e in (e32, e16, h16))
    assert lp16.dtype == torch.float32
    assert 0 < _gap(lp16, lp32, roll) < BF16_FWD
    assert 0 < _gap(lp16, lph, roll) < BF16_FUSED_VS_AUTOCAST
    att = roll["attention_mask"]
    keep = (att * F.pad(att[:, :-1], (1, 0))) > 0
    w = torch.linspace(-1, 1, int(keep.sum()))

    def grads(e):
        e.module.zero_grad()
        with torch.enable_grad():
            (e._head(roll)[keep] * w).sum().backward()
        assert {p.grad.dtype for p in e.module.parameters()} == {torch.float32}
        return torch.cat([p.grad.flatten() for p in e.module.parameters()])

    g32, g16, gh = grads(e32), grads(e16), grads(h16)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert 0 < rel(g16, gh) < BF16_GRAD_REL
    assert rel(g16, g32) < max(2 * rel(gh, g32), BF16_GRAD_REL)   # no worse than autocast
    assert {p.dtype for p in e16.module.parameters()} == {torch.float32}
    frozen = _engine(_decl("bf16", trainable=False, engine="fast"))
    frozen.load_weights(e32.export_weights())
    assert frozen.fused_forward and frozen.ran_precision() == "bf16"
    assert {p.dtype for p in frozen.module.parameters()} == {torch.bfloat16}
    assert 0 < _gap(frozen.forward(roll)["logprobs"], lp32, roll) < BF16_FWD
