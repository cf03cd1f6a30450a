"""The model families graphrl runs (graphrl.families.TINY: Llama-2, Llama-3.x rope, Mistral,
Qwen2 biases, Qwen3 q/k norm + head_dim, GPT-2), checked against Hugging Face's own
modules on random checkpoints built in code:

- the IR: a config's ModelSpec prints and parses back, rebuilds the same HF module, and
  counts its parameters exactly (every head);
- the hf engine: log-probs of left-padded / right-stopped rows equal HF's module run on
  each row alone (1e-5), and one GRPO optimizer step equals the same step done by hand
  (docs/engines.md tolerances); a model declared by its config dict (no checkpoint)
  builds the family's own module;
- DeepSpeed ZeRO-3 (dp=2, gloo) likewise, on the families whose weights differ in kind:
  in tests/test_engine_deepspeed.py, inside its one spawn (engine_diff._deepspeed_family);
- refusals before launch: an unknown config field (named), an architecture feature an
  engine lacks (model, engine, feature), weights that disagree with config.json.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphrl as gr  # noqa: E402
from engine_diff import hf_logprobs, real_pairs  # noqa: E402
from graphrl import architecture  # noqa: E402
from graphrl.backends.engines.hf import HFEngine  # noqa: E402
from graphrl.families import TINY, save_random_checkpoint  # noqa: E402
from graphrl.types import ModelSpec  # noqa: E402

FAMILIES = list(TINY)
# docs/engines.md: forward outputs 1e-5, loss 1e-4, whole-update relative error 5e-3,
# every weight 1e-2
FWD, LOSS, UPDATE, WEIGHTS = 1e-5, 1e-4, 5e-3, 1e-2
SCALAR = {"value": "AutoModelForTokenClassification",
          "score": "AutoModelForSequenceClassification"}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """A random checkpoint of each tiny family, saved once per session."""
    root = tmp_path_factory.mktemp("families")
    return {f: str(save_random_checkpoint(TINY[f], root / f, seed=i))
            for i, f in enumerate(FAMILIES)}


def hf_config(family: str):
    c = dict(TINY[family])
    return transformers.AutoConfig.for_model(c.pop("model_type"), **c)


def rows(vocab: int = 96, seed: int = 0):
    """Token rows as the engines see them: left padding (a shorter prompt), a row that
    stopped early (right padding), and a response mask over the generated part."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (4, 10), generator=g)
    att = torch.ones(4, 10)
    att[1, :3] = 0
    att[3, :1] = 0
    att[2, 8:] = 0
    tokens[att == 0] = 0
    mask = torch.zeros(4, 10)
    mask[:, 5:] = 1
    mask *= att
    return tokens, att, mask


# -- the IR -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_spec_round_trips_and_counts_the_hf_modules_parameters(family):
    from graphrl.parser import _Cursor, _model_spec

    config = hf_config(family)
    for head in ("lm", "value", "score"):
        spec = ModelSpec.from_hf_config(TINY[family], head=head)
        assert _model_spec(_Cursor(spec.text(), 1)) == spec, spec.text()
        assert ModelSpec.from_hf_config(spec.hf_config_dict(), head=head) == spec
        if head == "lm":
            module = transformers.AutoModelForCausalLM.from_config(config)
        else:
            cfg = hf_config(family)
            cfg.num_labels = 1
            module = getattr(transformers, SCALAR[head]).from_config(cfg)
        assert spec.num_params == sum(p.numel() for p in module.parameters()), head
    # what the spec rebuilds is the family's own module, tensor for tensor
    rebuilt = transformers.AutoModelForCausalLM.from_config(
        ModelSpec.from_hf_config(TINY[family]).hf_config())
    own = transformers.AutoModelForCausalLM.from_config(config)
    assert type(rebuilt) is type(own)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in own.state_dict().items()}


def test_architecture_fields_print_only_when_not_the_default():
    plain = ModelSpec.from_hf_config(TINY["llama2"])
    assert plain.text() == ModelSpec("llama", 96, 32, 2, 4, 2, 64, 128).text()
    qwen3 = ModelSpec.from_hf_config(TINY["qwen3"])
    assert "type=qwen3" in qwen3.text() and "head_dim=16" in qwen3.text()
    assert qwen3.head_dim == 16 and qwen3.qk_norm
    odd = dataclasses.replace(plain, model_type="llama", qkv_bias=True, o_bias=True,
                              mlp_bias=True, activation="gelu", rope_theta=5e5,
                              rope_scaling=(("factor", 2.0), ("rope_type", "linear")))
    from graphrl.parser import _Cursor, _model_spec

    assert _model_spec(_Cursor(odd.text(), 1)) == odd
    # the norms' epsilon (Llama-2 checkpoints: 1e-5, transformers' default 1e-6)
    for family, field in (("llama2", "rms_norm_eps"), ("gpt2", "layer_norm_epsilon")):
        spec = ModelSpec.from_hf_config({**TINY[family], field: 3e-5})
        assert getattr(spec.hf_config(), field) == 3e-5 and "eps=3e-05" in spec.text()
        assert _model_spec(_Cursor(spec.text(), 1)) == spec
    # the cost model sees head_dim: KV cache and attention FLOPs follow it
    from graphrl.compute_cost import attention_flops, kv_cache_bytes

    wide = dataclasses.replace(plain, head_dim=16)
    assert kv_cache_bytes(wide, 1, 8) == 2 * kv_cache_bytes(plain, 1, 8)
    assert attention_flops(wide, 1, 8, 8) == 2 * attention_flops(plain, 1, 8, 8)


# -- the hf engine ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_engine_logprobs_equal_hf_module(family, family_dirs):
    path = family_dirs[family]
    eng = HFEngine(gr.Model("m", path, role="policy", precision="fp32").decl(), {"checkpoint": path})
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch.float32).eval()
    tokens, att, _ = rows()
    got = eng.forward({"tokens": tokens, "attention_mask": att})["logprobs"]
    with torch.no_grad():
        want = hf_logprobs(hf, tokens, att)
    keep = real_pairs(att)
    assert (got - want)[keep].abs().max() < FWD


@pytest.mark.parametrize("family", FAMILIES)
def test_model_declared_by_its_config_builds_the_familys_module(family):
    model = gr.Model("policy", dict(TINY[family]), role="policy", precision="fp32")
    eng = HFEngine(model.decl(), {})
    own = transformers.AutoModelForCausalLM.from_config(hf_config(family)).eval()
    assert type(eng.module) is type(own)
    own.load_state_dict(eng.export_weights(), strict=True)
    tokens, att, _ = rows()
    got = eng.forward({"tokens": tokens, "attention_mask": att})["logprobs"]
    with torch.no_grad():
        want = hf_logprobs(own, tokens, att)
    assert (got - want)[real_pairs(att)].abs().max() < FWD


def _relative_update(after: dict, want: dict, start: dict) -> float:
    diff = torch.cat([(after[k] - want[k]).reshape(-1) for k in want])
    step = torch.cat([(want[k] - start[k]).reshape(-1) for k in want])
    return float(diff.norm() / step.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_engine_step_equals_a_step_by_hand(family, family_dirs):
    path, lr, kl_coef = family_dirs[family], 1e-3, 0.04
    eng = HFEngine(gr.Model("m", path, role="policy", trainable=True, precision="fp32").decl(),
                   {"checkpoint": path, "lr": lr})
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch.float32).eval()   # eval: no dropout
    tokens, att, mask = rows()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ref = hf_logprobs(hf, tokens, att) + 0.05 * torch.randn(4, 10, generator=g)
    adv = torch.randn(4, 10, generator=g)
    start = {k: v.clone() for k, v in hf.state_dict().items()}
    stats = eng.train({"rollout": {"tokens": tokens, "attention_mask": att,
                                   "response_mask": mask},
                       "advantages": {"advantages": adv},
                       "ref_logprobs": {"logprobs": ref}}, loss="grpo", seed=0)
    # GRPO on-policy (Shao et al. 2024 eq. 3): ratio 1 in value, its gradient that of
    # the log-probs; k3 KL to the reference; AdamW with the engine's defaults
    new = hf_logprobs(hf, tokens, att)
    mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    diff = ref - new
    loss = (-mean(torch.exp(new - new.detach()) * adv)
            + kl_coef * mean(torch.exp(diff) - diff - 1.0))
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    after, want = eng.export_weights(), hf.state_dict()
    assert list(after) == list(want)
    assert abs(stats["loss"] - loss.item()) < LOSS
    assert _relative_update(after, want, start) < UPDATE
    assert max(float((after[k] - want[k]).abs().max()) for k in want) < WEIGHTS


# -- refusals -----------------------------------------------------------------------------
def test_unknown_config_field_is_refused_by_name(family_dirs, tmp_path):
    with pytest.raises(gr.TraceError, match="rope_frobnication"):
        gr.Model("policy", {**TINY["qwen3"], "rope_frobnication": 2}, role="policy").spec
    # a read field whose value graphrl cannot express is refused by name as well
    with pytest.raises(gr.TraceError, match="scale_attn_by_inverse_layer_idx"):
        gr.Model("policy", {**TINY["gpt2"], "scale_attn_by_inverse_layer_idx": True},
                 role="policy").spec
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads(open(os.path.join(family_dirs["llama2"], "config.json")).read())
    (bad / "config.json").write_text(json.dumps({**config, "rope_frobnication": 2}))
    os.link(os.path.join(family_dirs["llama2"], "model.safetensors"),
            bad / "model.safetensors")
    with pytest.raises(gr.UsageError) as e:
        gr.Model("policy", str(bad), role="policy").spec
    assert "rope_frobnication" in str(e.value) and str(bad / "config.json") in str(e.value)


def _with_spec(graph, name: str, spec: ModelSpec):
    return dataclasses.replace(graph, models=tuple(
        dataclasses.replace(m, spec=dataclasses.replace(spec, head=m.spec.head))
        if m.name == name else m for m in graph.models))


def test_feature_an_engine_lacks_is_refused_before_launch(monkeypatch):
    from conftest import load_build
    from graphrl.backends.local import LocalExecutor
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph

    # megatron without q/k norm, fast without sliding windows (whatever they implement
    # by now: the refusal is what is checked)
    monkeypatch.setitem(architecture.ENGINE_FEATURES, "megatron",
                        architecture.ENGINE_FEATURES["megatron"] - {"qk_norm"})
    monkeypatch.setitem(architecture.ENGINE_FEATURES, "fast",
                        architecture.ENGINE_FEATURES["fast"] - {"sliding_window"})
    program = load_build("grpo")(gr.RunOptions(batch_size=8)).program()
    cpu4 = ClusterSpec.parse("1x4xcpu")
    qwen3 = ModelSpec.from_hf_config(TINY["qwen3"])
    graph = _with_spec(program.graph, "policy", qwen3)
    pins = {"policy.train": {"gpus": "0-1", "tp": 2, "engine": "megatron"}}
    with pytest.raises(gr.UsageError) as e:
        compile_graph(graph, cpu4, "auto", placement=pins, engines=True)
    msg = str(e.value)
    assert "model policy" in msg and "engine megatron" in msg, msg
    assert architecture.FEATURES["qk_norm"] in msg, msg
    compile_graph(graph, cpu4, "auto", placement=pins, engines=False)   # planning only

    windowed = ModelSpec.from_hf_config({**TINY["mistral"], "sliding_window": 8})
    fast = _with_spec(program.graph, "policy", windowed)
    fast = dataclasses.replace(fast, models=tuple(
        dataclasses.replace(m, engine="fast") if m.name == "policy" else m
        for m in fast.models))
    with pytest.raises(gr.UsageError, match="engine fast.*sliding-window"):
        compile_graph(fast, cpu4, "auto", engines=True)

    # the local backend: refused before any engine is built
    models = dict(program.models)
    models["policy"] = dataclasses.replace(models["policy"], config=dict(TINY["qwen3"]),
                                           engine="megatron")
    local = dataclasses.replace(program, models=models)
    built = []
    monkeypatch.setattr("graphrl.backends.local.create_engine",
                        lambda *a, **k: built.append(a))
    with pytest.raises(gr.UsageError, match="model policy: engine megatron"):
        LocalExecutor(local)
    assert built == []


def test_weights_that_disagree_with_the_config_are_refused(family_dirs, tmp_path):
    def variant(family: str, **fields) -> str:
        d = tmp_path / f"{family}-{'-'.join(fields)}"
        d.mkdir()
        src = family_dirs[family]
        config = json.loads(open(os.path.join(src, "config.json")).read())
        (d / "config.json").write_text(json.dumps({**config, **fields}))
        os.link(os.path.join(src, "model.safetensors"), d / "model.safetensors")
        return str(d)

    cases = [  # (directory, what the error names)
        (variant("llama2", num_hidden_layers=3), ["model.layers.2.", "num_hidden_layers=3"]),
        (variant("gpt2", n_layer=1), ["transformer.h.1.", "n_layer=1"]),
        (variant("qwen3", head_dim=8), ["self_attn.q_proj.weight", "model.safetensors",
                                        "[64, 32]", "[32, 32]"]),
    ]
    for path, needles in cases:
        with pytest.raises(gr.UsageError) as e:
            HFEngine(gr.Model("policy", path, role="policy").decl(), {"checkpoint": path})
        msg = str(e.value)
        assert path in msg and "engine hf" in msg, msg
        for needle in needles:
            assert needle in msg, (needle, msg)

    # the Ray driver checks every checkpoint before a worker starts (launch.compile_for)
    from conftest import load_build
    from graphrl.backends.engines.hf_checkpoint import check_checkpoints
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph

    program = load_build("grpo")(gr.RunOptions(batch_size=8)).program()
    path = cases[0][0]
    policy = dataclasses.replace(program.models["policy"], config=path)
    graph = _with_spec(program.graph, "policy", policy.spec)
    pins = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3, "engine": "deepspeed"}}
    placed = compile_graph(graph, ClusterSpec.parse("1x4xcpu"), "auto", placement=pins,
                           engines=True).graph
    with pytest.raises(gr.UsageError, match="model policy, engine deepspeed.*layers.2"):
        check_checkpoints({**program.models, "policy": policy}, placed)


def test_placement_search_never_chooses_an_engine_lacking_a_feature(monkeypatch):
    from graphrl.passes.engine_choice import engine_variants
    from graphrl.parallel import Strategy

    monkeypatch.setitem(architecture.ENGINE_FEATURES, "megatron",
                        architecture.ENGINE_FEATURES["megatron"] - {"qk_norm"})
    tp2, flat = Strategy(tp=2), Strategy(dp=2, zero=1, micro_batches=2)
    assert [s.engine for s in engine_variants("train", tp2)] == ["megatron"]
    assert engine_variants("train", tp2, features=frozenset({"qk_norm"})) == []
    assert [s.engine for s in engine_variants("train", flat, features=frozenset(
        {"qk_norm"}))] == ["deepspeed"]
    # a pinned engine stays pinned (its refusal names the feature)
    assert [s.engine for s in engine_variants("train", tp2, "megatron",
                                              frozenset({"qk_norm"}))] == ["megatron"]


def test_graph_with_architecture_fields_round_trips_through_its_text():
    from conftest import load_build
    from graphrl.parser import parse_graph
    from graphrl.printer import print_graph

    graph = load_build("grpo")(gr.RunOptions(batch_size=8)).program().graph
    for family in ("llama3", "qwen2", "qwen3"):
        g = _with_spec(graph, "policy", ModelSpec.from_hf_config(TINY[family]))
        assert parse_graph(print_graph(g)) == g, family
