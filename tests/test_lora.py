"""LoRA (graphrl/lora.py, backends/engines/lora_hf.py): declared, printed and parsed,
verified, priced and placed, executed on the hf engine through peft, saved as a PEFT
adapter directory that peft loads, resumed exactly."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import graphrl as gr
from conftest import load_build
from graphrl.errors import GraphError, UsageError
from graphrl.lora import parse_lora_option

LORA = "policy:r=4,alpha=8,targets=q_proj,v_proj"


def tiny_decl(lora=gr.LoRA(r=2, alpha=4.0, targets=("q_proj", "v_proj")),
              precision: str = "fp32", name: str = "policy", trainable: bool = True):
    spec = gr.ModelSpec("llama", 16, 32, 2, 2, 2, 64, 32, dtype=precision, lora=lora)
    return gr.ModelDecl(name, spec, "policy", trainable)


def rollout(n: int = 4, seq: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    resp = torch.zeros(n, seq)
    resp[:, 4:] = 1
    return {"tokens": torch.randint(0, 16, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq), "response_mask": resp,
            "row": torch.arange(n)}


def grpo_inputs(seed: int = 0):
    r = rollout(seed=seed)
    zeros = {"logprobs": torch.zeros(4, 8)}
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * r["response_mask"]
    return {"rollout": r, "old_logprobs": zeros, "ref_logprobs": zeros,
            "advantages": {"advantages": adv}}


# -- the declaration -----------------------------------------------------------------------
def test_lora_option_parses_and_the_graph_round_trips():
    role, lora = parse_lora_option("policy:r=16,alpha=32,targets=q_proj,v_proj,dropout=0.1")
    assert role == "policy" and lora == gr.LoRA(16, 32.0, ("q_proj", "v_proj"), 0.1)
    opts = gr.RunOptions(lora=(LORA,))
    program = load_build("grpo")(opts).program()
    g = program.graph
    policy, reference = g.model("policy"), g.model("reference")
    assert policy.spec.lora == gr.LoRA(4, 8.0, ("q_proj", "v_proj"))
    assert reference.shares_base == "policy" and reference.spec.lora is None
    assert g.value("%reference@0").spec.weight_bytes == 0   # no weights of its own
    text = g.text()
    assert '"targets":["q_proj","v_proj"]' in text and "base=policy" in text
    assert gr.parse_graph(text) == g


def test_trained_params_are_what_peft_trains():
    """The spec's count (r * (in + out) per target per layer) against peft's own module,
    for a llama (GQA: k/v narrower than q) and a gpt2 (c_proj in attention and MLP)."""
    from peft import LoraConfig, get_peft_model

    from graphrl.backends.engines.hf import build_module

    for family, targets in (("llama", ("q_proj", "k_proj", "down_proj")),
                            ("gpt2", ("c_attn", "c_proj"))):
        kv = 1 if family == "llama" else 2
        lora = gr.LoRA(r=3, targets=targets)
        spec = gr.ModelSpec(family, 16, 32, 2, 2, kv, 48, 32, lora=lora)
        module = build_module(gr.ModelDecl("m", replace(spec, lora=None), "policy", True))
        peft = get_peft_model(module, LoraConfig(r=3, target_modules=list(targets),
                                                 fan_in_fan_out=family == "gpt2"))
        trained = sum(p.numel() for p in peft.parameters() if p.requires_grad)
        assert spec.trained_params == trained, family


def test_apply_lora_shares_the_base_only_when_it_is_the_starting_policy():
    """A frozen lm model becomes the shared base of a model with fresh adapters when it
    starts as that model (init_from, or the same model directory); not when the
    adapters continue from a directory (the starting policy is then not the base), and
    never for a reward model."""
    from graphrl.lora import apply_lora

    models = (gr.Model("policy", "dir/a", "policy", trainable=True),
              gr.Model("reference", "dir/a", "reference"),
              gr.Model("ref2", {}, "reference", init_from="policy"),
              gr.Model("reward", "dir/a", "reward", head="score"),
              gr.Model("other", "dir/b", "reference"))
    out = {m.name: m for m in apply_lora(models, {"policy": gr.LoRA(r=4)})}
    assert out["policy"].lora == gr.LoRA(r=4)
    assert (out["reference"].shares_base, out["ref2"].shares_base) == ("policy", "policy")
    assert out["ref2"].init_from == ""
    assert out["reward"].shares_base == out["other"].shares_base == ""
    kept = apply_lora(models, {"policy": gr.LoRA(r=4, adapter="some/adapter")})
    assert [m.shares_base for m in kept] == [""] * 5


@pytest.mark.parametrize("make,needle", [
    (lambda: gr.LoRA(r=0), "the rank must be an int > 0"),
    (lambda: gr.LoRA(r=-2), "the rank must be an int > 0"),
    (lambda: parse_lora_option("policy:r=4,alphaa=3"), "unknown or repeated key 'alphaa'"),
    (lambda: gr.RunOptions(lora=(LORA, LORA)).loras(), "a role is given twice"),
])
def test_bad_lora_values_are_refused(make, needle):
    with pytest.raises(UsageError, match=needle):
        make()


def test_the_verifier_refuses_a_missing_target_and_a_base_without_lora():
    build = load_build("grpo")
    with pytest.raises(GraphError, match=r"LoRA target 'q_prj' is not a linear .*q_proj"):
        build(gr.RunOptions(lora=("policy:targets=q_prj",))).program()
    exp = build(gr.RunOptions())
    models = tuple(replace(m, init_from="", shares_base="policy") if m.name == "reference"
                   else m for m in exp.models)
    with pytest.raises(GraphError, match="shares_base='policy' is not a model with LoRA"):
        replace(exp, models=models).program()
    with pytest.raises(UsageError, match="--lora: grpo_step has no model 'polcy'"):
        build(gr.RunOptions(lora=("polcy:r=4",))).with_precision(
            gr.RunOptions(lora=("polcy:r=4",)))


def test_engines_without_lora_are_refused_with_the_reason():
    from graphrl.architecture import refuse_unsupported

    spec = tiny_decl().spec
    with pytest.raises(UsageError, match="engine megatron cannot run .*LoRA adapters"):
        refuse_unsupported("policy", "megatron", spec.arch)
    for engine in ("hf", "fast", "deepspeed"):   # deepspeed: tests/test_deepspeed_lora.py
        refuse_unsupported("policy", engine, spec.arch)


# -- planned -------------------------------------------------------------------------------
def test_the_cost_model_prices_adapters_as_its_formulas_say():
    """Model states = base weights (2 B/param in bf16, /dp under ZeRO-3) + 16 B per
    adapter parameter (sharded as the stage says); the backward computes data gradients
    only (1x the forward instead of 2x); the weight sync moves the adapters' bytes."""
    from graphrl.cost import CALIBRATED, model_state_bytes, train_breakdown
    from graphrl.parallel import Strategy

    full = gr.llama2("7b")
    lora = replace(full, lora=gr.LoRA(r=16))
    n, t = full.num_params, lora.trained_params
    assert t == 32 * 16 * (4096 + 4096) * 2   # q and v: r (in + out) per layer
    assert model_state_bytes(lora, Strategy()) == 2 * n + 16 * t
    z3 = Strategy(dp=4, zero=3)
    assert model_state_bytes(lora, z3) == pytest.approx(2 * n / 4 + 16 * t / 4)
    assert model_state_bytes(full, z3) == pytest.approx(16 * n / 4)
    bwd = CALIBRATED.bwd_eff_ratio
    c_full, c_lora = (train_breakdown(s, 8, 512)["compute"] for s in (full, lora))
    assert c_lora / c_full == pytest.approx((1 + 1 / bwd) / (1 + 2 / bwd))
    assert lora.sync_bytes == 2 * t and full.sync_bytes == full.weight_bytes



@pytest.fixture(scope="module")
def ppo_70b():
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph

    def compile_it(cluster: str, lora: tuple[str, ...]):
        opts = gr.RunOptions(model_size="70b", lora=lora)
        graph = load_build("ppo")(opts).program().graph
        return compile_graph(graph, ClusterSpec.parse(cluster), "auto")
    return compile_it


def test_70b_ppo_with_lora_fits_on_fewer_gpus(ppo_70b):
    """Full fine-tuning of 70B PPO does not fit one 8xH100 node; with LoRA on the policy
    it does, its reference runs on the policy's weights (same GPUs, no weights of its
    own) and the weight sync moves adapters only."""
    with pytest.raises(UsageError, match="no placement fits on 1x8xH100"):
        ppo_70b("1x8xH100", ())
    plan = ppo_70b("1x8xH100", ("policy:r=16",)).plan
    g = plan.graph
    calls = {n.call: n for n in g.calls()}
    train, ref = calls["policy.train"], calls["reference.forward"]
    assert ref.placement.mesh == train.placement.mesh
    assert not any(unit == "reference" and b for _, unit, b in plan.resident)
    spec = g.model("policy").spec
    assert spec.trained_params < spec.num_params / 500
    reshards = [n for n in g.nodes if n.target == "reshard" and n.model == "policy"]
    for n in reshards:
        assert n.attr("sync") == "adapters"
        assert n.attr("network_bytes") <= 2 * spec.sync_bytes * train.placement.mesh.size


def test_a_shared_base_pinned_away_from_its_owner_is_refused():
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph

    graph = load_build("grpo")(gr.RunOptions(model_size="7b", lora=("policy",))).program().graph
    pins = {"policy.train": {"gpus": "0-3"}, "reference.forward": {"gpus": "4-7"}}
    with pytest.raises(UsageError, match="'reference.forward': gpus 4-7 differ from 0-3"):
        compile_graph(graph, ClusterSpec.parse("1x8xH100"), "auto", placement=pins)


def test_compare_shows_full_and_lora_rows(capsys):
    import json

    from conftest import ROOT
    from graphrl.cli import main

    assert main(["compare", str(ROOT / "examples" / "grpo.py"), "--model-size", "7b",
                 "--cluster", "1x8xH100", "--lora", "policy:r=16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["tuning"] for r in rows] == ["full"] * (len(rows) // 2) + ["lora"] * (
        len(rows) // 2)
    full, lora = ({r["policy"]: r for r in rows if r["tuning"] == t} for t in ("full", "lora"))
    assert full.keys() == lora.keys() and full["auto"]["feasible"] and lora["auto"]["feasible"]


# -- executed (hf engine through peft) -------------------------------------------------------
def test_only_adapters_train_and_the_shared_base_is_the_untrained_model():
    from graphrl.backends.engines.hf import HFEngine, build_module
    from graphrl.backends.engines.lora_hf import SharedBase

    decl = tiny_decl()
    e = HFEngine(decl, {"lr": 1e-2}, seed=0)
    ref = SharedBase(gr.ModelDecl("reference", replace(decl.spec, lora=None), "reference",
                                  False, shares_base="policy"), e)
    r = rollout()
    before = ref.forward(r)["logprobs"]
    assert torch.equal(e.forward(r)["logprobs"], before)   # B = 0: the base itself
    base_before = {k: v for k, v in e.export_weights().items() if "lora_" not in k}
    for _ in range(3):
        e.train(grpo_inputs(), loss="grpo", clip=0.2, kl_coef=0.0)
    after = e.export_weights()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert {n for n, p in e.module.named_parameters() if p.requires_grad} == \
        {k for k in after if "lora_" in k}
    opt_params = sum(p.numel() for g in e.optimizer.param_groups for p in g["params"])
    assert opt_params == decl.spec.trained_params
    assert not torch.allclose(e.forward(r)["logprobs"], before)
    assert torch.equal(ref.forward(r)["logprobs"], before)   # adapters off: unchanged
    # the base, against Hugging Face's own module built the same way
    plain = build_module(gr.ModelDecl("policy", replace(decl.spec, lora=None), "policy", True))
    plain.load_state_dict(ref.export_weights())
    logits = plain(input_ids=r["tokens"]).logits
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, r["tokens"][:, 1:, None])[..., 0]
    assert torch.allclose(before[:, 1:], want, atol=1e-5)


def test_bf16_holds_a_bf16_base_and_fp32_adapters():
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.precision import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16 kernels")
    e = HFEngine(tiny_decl(precision="bf16"), {}, seed=0)
    dtypes = {p.requires_grad: p.dtype for p in e.module.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    e.train(grpo_inputs(), loss="grpo", clip=0.2, kl_coef=0.0)
    assert e.ran_precision() == "bf16"
    states = [s["exp_avg"].dtype for s in e.optimizer.state.values()]
    assert states and set(states) == {torch.float32}


def test_save_is_a_peft_adapter_that_peft_loads(tmp_path):
    """--save writes adapter_config.json + adapter_model.safetensors (and the base built
    in code beside it); peft's own loading gives the engine's log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.lora_hf import save_adapter

    e = HFEngine(tiny_decl(), {"lr": 1e-2}, seed=0)
    e.train(grpo_inputs(), loss="grpo", clip=0.2, kl_coef=0.0)
    out = tmp_path / "adapter"
    model = gr.Model("policy", e.decl.spec, "policy", trainable=True, lora=e.decl.spec.lora)
    save_adapter(str(out), e, None, {"policy": model}, None)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    loaded = PeftModel.from_pretrained(base, out)
    r = rollout(seed=3)
    logits = loaded(input_ids=r["tokens"]).logits
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, r["tokens"][:, 1:, None])[..., 0]
    assert torch.allclose(e.forward(r)["logprobs"][:, 1:], want, atol=1e-5)
    # a directory holding a full model is refused; an adapter made for r=2 is not r=4
    with pytest.raises(UsageError, match="holds a full model"):
        save_adapter(str(out / "base"), e, None, {"policy": model}, None)
    other = tiny_decl(lora=gr.LoRA(r=4, targets=("q_proj", "v_proj"), adapter=str(out)))
    with pytest.raises(UsageError, match=r"made with r 2 \(the spec says 4\)"):
        HFEngine(other, {}, seed=0)
    wider = tiny_decl(lora=replace(e.decl.spec.lora, adapter=str(out)))
    wider = replace(wider, spec=replace(wider.spec, hidden_size=48))
    with pytest.raises(UsageError, match="does not fit this base"):
        HFEngine(wider, {}, seed=0)
    import json
    import shutil

    renamed = tmp_path / "renamed"
    shutil.copytree(out, renamed, ignore=shutil.ignore_patterns("base"))
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps(
        {**cfg, "base_model_name_or_path": "/models/another-llama"}))
    with pytest.raises(UsageError, match="made for base '/models/another-llama'"):
        HFEngine(tiny_decl(lora=replace(e.decl.spec.lora, adapter=str(renamed))),
                 {"checkpoint": str(out / "base")}, seed=0)
    # continuing from it: the same function as the saved model
    again = HFEngine(tiny_decl(lora=replace(e.decl.spec.lora, adapter=str(out))),
                     {"checkpoint": str(out / "base")}, seed=1)
    assert torch.allclose(again.forward(r)["logprobs"], e.forward(r)["logprobs"], atol=1e-6)


def test_resume_from_state_is_bit_exact():
    from graphrl.backends.engines.hf import HFEngine

    a = HFEngine(tiny_decl(), {"lr": 1e-2}, seed=0)
    a.train(grpo_inputs(0), loss="grpo", clip=0.2, kl_coef=0.0)
    b = HFEngine(tiny_decl(), {"lr": 1e-2}, seed=5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))   # as from a file: no shared tensors
    assert set(a.state_dict()["optimizer"]["state"]) == {
        n for n, p in a.module.named_parameters() if p.requires_grad}
    for e in (a, b):
        e.train(grpo_inputs(1), loss="grpo", clip=0.2, kl_coef=0.0, seed=1)
    wa, wb = a.export_weights(), b.export_weights()
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a.version == b.version == 2


def test_fast_engine_generates_from_the_merged_adapters():
    """The fast engine's decode copy holds W + (alpha / r) B A, merged at each refresh:
    greedy tokens equal the hf engine's (peft's unmerged forward) on the same state, and
    the frozen base is bit-exact afterwards."""
    from graphrl.backends.engines.fast import FastEngine
    from graphrl.backends.engines.hf import HFEngine

    decl = replace(tiny_decl(), engine="fast")
    fast = FastEngine(decl, {"lr": 3e-2}, seed=0)
    prompts = {"tokens": torch.randint(0, 16, (4, 4), generator=torch.Generator().manual_seed(2))}
    first = fast.generate(prompts, max_new_tokens=6, temperature=0.0)["tokens"]
    for _ in range(3):
        fast.train(grpo_inputs(), loss="grpo", clip=0.2, kl_coef=0.0)
    base = {k: v for k, v in fast.export_weights().items() if "lora_" not in k}
    tokens = fast.generate(prompts, max_new_tokens=6, temperature=0.0)["tokens"]
    hf = HFEngine(tiny_decl(), {}, seed=1)
    hf.load_state_dict(copy.deepcopy(fast.state_dict()))
    assert torch.equal(tokens, hf.generate(prompts, max_new_tokens=6, temperature=0.0)["tokens"])
    assert not torch.equal(tokens, first)   # the refresh took the trained adapters
    from graphrl.backends.engines.lora_hf import SharedBase

    ref = SharedBase(gr.ModelDecl("reference", replace(decl.spec, lora=None), "reference",
                                  False, "fast", shares_base="policy"), fast)
    assert torch.equal(ref.generate(prompts, max_new_tokens=6, temperature=0.0)["tokens"],
                       first)   # adapters off: the base's decode copy
    after = fast.export_weights()
    assert all(torch.equal(after[k], v) for k, v in base.items())


TINY_PPO = '''
import dataclasses, sys
sys.path.insert(0, {examples!r})
import ppo
from common import task_for, train_reward_model


def build(opts):
    """PPO with a reward model trained briefly (tests)."""
    exp = ppo.build(opts)
    task = task_for(opts)
    return dataclasses.replace(exp, iterations=4, prepare=lambda engines:
        train_reward_model(engines["reward"], task, opts.seed, pairs=64, epochs=1))
'''


def test_a_lora_run_resumes_bit_exact_and_saves_an_adapter(tmp_path):
    """PPO with --lora on the local backend: checkpoints hold the adapters and their Adam
    state (the shared-base reference holds nothing), a resumed run equals the
    uninterrupted one, and --save writes a PEFT adapter with the critic beside it."""
    import os

    from conftest import ROOT
    from graphrl.checkpoint import published
    from graphrl.example_file import load_example
    from graphrl.runner import run_experiment

    path = tmp_path / "tiny_ppo.py"
    path.write_text(TINY_PPO.format(examples=str(ROOT / "examples")))
    torch.set_num_threads(1)

    def run(**kw):
        opts = gr.RunOptions(batch_size=4, quiet=True, lora=(LORA,), **kw)
        summary = run_experiment(load_example(str(path))(opts), opts,
                                 out=open(os.devnull, "w"))
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in summary.rows]

    ckpts = tmp_path / "ckpt"
    rows = run(checkpoint_dir=str(ckpts), checkpoint_every=2, save=str(tmp_path / "out"),
               save_merged=str(tmp_path / "merged"))
    first = published(ckpts)[0]
    state = torch.load(first / "models" / "policy.pt", weights_only=False)
    assert set(state["optimizer"]["state"]) == {k for k in state["weights"] if "lora_" in k}
    assert "weights" not in torch.load(first / "models" / "reference.pt", weights_only=False)
    assert run(resume=str(first)) == rows
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "critic" / "config.json").is_file()
    with pytest.raises(UsageError, match="holds an earlier output"):
        run(save=str(tmp_path / "out"))
    with pytest.raises(UsageError, match="holds a full model"):
        run(save=str(tmp_path / "out" / "critic"), overwrite=True)
    # --save-merged: a plain HF model with the function of base + adapter (bf16 merge)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokens = rollout(seed=4)["tokens"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base"), tmp_path / "out")
    with torch.no_grad():
        a, b = (torch.log_softmax(m(input_ids=tokens).logits.float(), -1)
                for m in (merged, adapted))
    assert (a - b).abs().max() < 0.05
    with pytest.raises(UsageError, match="--save-merged .* no model of ppo_step trains LoRA"):
        opts = gr.RunOptions(batch_size=4, quiet=True, save_merged=str(tmp_path / "m2"))
        run_experiment(load_example(str(path))(opts), opts)


def test_adapter_dropout_runs_while_training_only():
    """dropout > 0: forward and generate are deterministic (eval), the train step draws
    dropout masks (two steps from one state and seed differ only through them)."""
    from graphrl.backends.engines.hf import HFEngine

    decl = tiny_decl(lora=gr.LoRA(r=2, alpha=4.0, targets=("q_proj", "v_proj"), dropout=0.5))
    e = HFEngine(decl, {"lr": 1e-2}, seed=0)
    with torch.no_grad():
        for n, p in e.module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)   # adapters that matter
    r = rollout()
    assert torch.equal(e.forward(r)["logprobs"], e.forward(r)["logprobs"])
    state = copy.deepcopy(e.state_dict())
    losses = []
    for s in (1, 2):
        torch.manual_seed(s)
        e.load_state_dict(copy.deepcopy(state))
        losses.append(e.train(grpo_inputs(), loss="grpo", clip=0.2, kl_coef=0.0)["loss"])
    assert losses[0] != losses[1]
    assert not any(m.training for m in e.module.modules())
