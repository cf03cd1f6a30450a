"""LoRA on every model family graphrl accepts, against peft's own modules: for each tiny
config of graphrl.families.TINY (Llama-2, Llama-3.x rope scaling, Mistral, Qwen2 with
q/k/v biases and tied embeddings, Qwen3 with q/k norm and head_dim != hidden / heads,
GPT-2 with Conv1D c_attn/c_proj/c_fc) and a Mistral sliding window, the hf engine's LoRA
(every linear of the family targeted, B non-zero) gives the log-probs of a model built
directly with peft's LoraConfig / get_peft_model on the same base and adapter weights;
its first AdamW step moves each adapter entry by lr * sign of peft's own gradient; the
fast engine's merged generation equals the hf engine's (peft unmerged) greedy tokens,
each the argmax of peft's logits. Then PEFT adapter directories written by peft itself:
loaded (gr.LoRA(adapter=DIR), --lora policy:adapter=DIR) with peft's log-probs, and
refused before any work when made for another base; and bf16 on a second family."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

import graphrl as gr
from graphrl.errors import UsageError
from graphrl.families import TINY, save_random_checkpoint
from graphrl.hf_dir import read_config

VARIANTS = {**TINY, "mistral_window": dict(TINY["mistral"], sliding_window=6)}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA, LR = 4, 8.0, 1e-2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora_families")
    return {name: str(save_random_checkpoint(cfg, root / name, seed=i))
            for i, (name, cfg) in enumerate(VARIANTS.items())}


def targets(name: str) -> tuple[str, ...]:
    """Every linear of the family; the untied Llama-3 config also its output head."""
    if name == "gpt2":
        return ("c_attn", "c_proj", "c_fc")
    return LLAMA_LINEARS + (("lm_head",) if name == "llama3" else ())


def lora_decl(path: str, name: str, engine: str = "hf", precision: str = "fp32",
              lora: gr.LoRA | None = None) -> gr.ModelDecl:
    spec = gr.ModelSpec.from_hf_config(read_config(path))
    spec = replace(spec, dtype=precision, lora=lora or gr.LoRA(R, ALPHA, targets(name)))
    return gr.ModelDecl("policy", spec, "policy", True, engine)


def peft_model(path: str, name: str):
    """peft's own LoRA model on the checkpoint: LoraConfig + get_peft_model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets(name)),
                        lora_dropout=0.0, fan_in_fan_out=name == "gpt2")
    return get_peft_model(base, config).eval()


def copy_adapters(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    params = dict(dst.named_parameters())
    n = 0
    with torch.no_grad():
        for k, v in src.named_parameters():
            if "lora_" in k:
                params[k].copy_(v)
                n += 1
    return n


def rollout(vocab: int, n: int = 6, seq: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    resp = torch.zeros(n, seq)
    resp[:, 5:] = 1
    return {"tokens": torch.randint(0, vocab, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq), "response_mask": resp, "row": torch.arange(n)}


def peft_logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]


def randomize_b(module: torch.nn.Module, seed: int) -> None:
    """Non-zero B (peft starts it at 0): the adapters then change the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in module.named_parameters():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_engine_lora_is_peft_lora(name, checkpoints):
    """Log-probs equal peft's before and after one train step; the step's update is
    AdamW's first step, lr * sign(g), on peft's own gradient g of the same loss."""
    from graphrl.backends.engines.hf import HFEngine

    path = checkpoints[name]
    e = HFEngine(lora_decl(path, name), {"checkpoint": path, "lr": LR}, seed=0)
    randomize_b(e.module, seed=1)
    ref = peft_model(path, name)
    assert copy_adapters(e.module, ref) == 2 * len([
        m for m in ref.modules() if hasattr(m, "lora_A") and "default" in m.lora_A])
    assert {k for k, p in e.module.named_parameters() if p.requires_grad} == \
        {k for k, p in ref.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in ref.parameters() if p.requires_grad) == \
        e.decl.spec.trained_params   # graphrl's count (the cost model's) is peft's
    vocab = ref.config.vocab_size
    r = rollout(vocab)
    mine = e.forward(r)["logprobs"]
    want = peft_logprobs(ref, r["tokens"])
    assert torch.allclose(mine[:, 1:], want.detach(), atol=1e-5), name

    # peft's gradient of -sum(adv * logp) over the response: at ratio 1 (old log-probs
    # = the current ones, no KL) GRPO's loss has this gradient up to a positive factor
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])[:, None] * r["response_mask"]
    (-(adv[:, 1:] * want).sum()).backward()
    grads = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    before = {k: p.detach().clone() for k, p in e.module.named_parameters()}
    e.train({"rollout": r, "old_logprobs": {"logprobs": mine}, "ref_logprobs":
             {"logprobs": mine}, "advantages": {"advantages": adv}},
            loss="grpo", clip=0.2, kl_coef=0.0)
    for k, p in e.module.named_parameters():
        if k not in grads:
            assert torch.equal(p, before[k]), f"{name}: frozen {k} changed"
            continue
        g = grads[k]
        big = g.abs() > 1e-3 * g.abs().max()
        assert big.any()
        step = (p.detach() - before[k])[big]
        assert torch.allclose(step, -LR * g[big].sign(), rtol=0.02, atol=0), f"{name}: {k}"
    copy_adapters(e.module, ref)
    assert torch.allclose(e.forward(r)["logprobs"][:, 1:],
                          peft_logprobs(ref, r["tokens"]).detach(), atol=1e-5), name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fast_engine_merged_generation_is_peft_greedy(name, checkpoints):
    """The fast engine (adapters merged into its decode copy) and the hf engine (peft's
    unmerged forward) generate the same greedy tokens, past the sliding window; each is
    the argmax of peft's own model's logits at its position."""
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.registry import create_engine

    path = checkpoints[name]
    hf = HFEngine(lora_decl(path, name), {"checkpoint": path}, seed=0)
    randomize_b(hf.module, seed=2)
    fast = create_engine("fast", lora_decl(path, name, "fast"), {"checkpoint": path}, "cpu", 1)
    fast.load_state_dict(copy.deepcopy(hf.state_dict()))
    vocab = hf.module.config.vocab_size
    prompts = {"tokens": torch.randint(0, vocab, (4, 5), generator=torch.Generator()
                                       .manual_seed(4))}
    got = fast.generate(prompts, max_new_tokens=10, temperature=0.0)["tokens"]
    assert torch.equal(got, hf.generate(prompts, max_new_tokens=10, temperature=0.0)["tokens"])
    ref = peft_model(path, name)
    copy_adapters(hf.module, ref)
    with torch.no_grad():
        logits = ref(input_ids=got).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), got[:, 5:]), name
    base = create_engine("fast", lora_decl(path, name, "fast"), {"checkpoint": path}, "cpu", 1)
    plain = base.generate(prompts, max_new_tokens=10, temperature=0.0)["tokens"]
    assert not torch.equal(plain, got)   # the adapters took part


# -- PEFT adapter directories written by peft itself --------------------------------------
def peft_adapter(path: str, out, target_modules=("q_proj", "v_proj"), r: int = R,
                 seed: int = 5) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=ALPHA,
                                            target_modules=list(target_modules)))
    randomize_b(model, seed)
    model.save_pretrained(str(out))
    return model.eval()


@pytest.fixture(scope="module")
def adapter_dir(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model = peft_adapter(checkpoints["llama2"], out)
    return out, model


def test_an_adapter_peft_wrote_is_continued_with_peft_logprobs(checkpoints, adapter_dir):
    from graphrl.backends.engines.hf import HFEngine

    out, model = adapter_dir
    path = checkpoints["llama2"]
    lora = gr.LoRA(adapter=str(out))   # r, alpha and targets read from the directory
    assert (lora.r, lora.alpha, set(lora.targets)) == (R, ALPHA, {"q_proj", "v_proj"})
    e = HFEngine(lora_decl(path, "llama2", lora=lora), {"checkpoint": path}, seed=3)
    r = rollout(96, seed=7)
    want = peft_logprobs(model, r["tokens"]).detach()
    assert torch.allclose(e.forward(r)["logprobs"][:, 1:], want, atol=1e-5)
    with model.disable_adapter():
        base = peft_logprobs(model, r["tokens"]).detach()
    assert not torch.allclose(e.forward(r)["logprobs"][:, 1:], base, atol=1e-3)   # B != 0
    role, parsed = gr.lora.parse_lora_option(f"policy:adapter={out}")
    assert role == "policy" and parsed == lora


def test_the_command_line_continues_from_a_peft_adapter(checkpoints, adapter_dir):
    """--model policy=DIR --lora policy:adapter=ADAPTER: the graph's spec holds the
    directory's r, alpha and targets, and a run starts from peft's function."""
    from conftest import load_build

    out, _ = adapter_dir
    path = checkpoints["llama2"]
    opts = gr.RunOptions(lora=(f"policy:adapter={out}",), model_dirs=(("policy", path),))
    program = load_build("grpo")(opts).program()
    policy = program.graph.model("policy")
    assert policy.spec.lora.r == R and policy.spec.lora.adapter == str(out)
    # a policy continuing from an adapter is not its base: the reference keeps its own
    assert not program.graph.model("reference").shares_base


@pytest.mark.parametrize("case,needle", [
    ("hidden", r"q_proj\.lora_A.*shape \[4, 48\].*needs \[4, 32\]"),
    ("base", "made for base '/models/another-llama'"),
    ("targets", r"target_modules \['k_proj', 'q_proj', 'v_proj'\] \(the spec says"),
    ("rank", r"r 8 \(the spec says 4\)"),
])
def test_an_adapter_for_another_base_is_refused_before_any_work(case, needle, checkpoints,
                                                              tmp_path):
    """Refused with one line naming the directory and what disagrees, when the program
    is verified (shapes and config: before any engine) or the engine is built (the base
    it names against the directory the model loads)."""
    from graphrl.backends.engines.hf import HFEngine

    path = checkpoints["llama2"]
    out = tmp_path / case
    if case == "hidden":
        wide = save_random_checkpoint(dict(TINY["llama2"], hidden_size=48), tmp_path / "w")
        peft_adapter(str(wide), out)
    elif case == "base":
        peft_adapter(path, out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps(
            {**cfg, "base_model_name_or_path": "/models/another-llama"}))
    elif case == "targets":
        peft_adapter(path, out, target_modules=("q_proj", "k_proj", "v_proj"))
    else:
        peft_adapter(path, out, r=8)
    lora = gr.LoRA(R, ALPHA, ("q_proj", "v_proj"), adapter=str(out))
    decl = lora_decl(path, "llama2", lora=lora)
    with pytest.raises(UsageError, match=needle) as info:
        if case == "base":
            HFEngine(decl, {"checkpoint": path}, seed=0)
        else:
            decl.spec.lora.check(decl.spec, "model policy")
    assert "\n" not in str(info.value) and str(out) in str(info.value)


def test_save_into_a_full_model_directory_is_refused_before_the_run(checkpoints, capsys):
    """`graphrl run ... --lora policy --save DIR --overwrite`, DIR a full HF model: exit
    status 2, one error line, no iteration run, DIR untouched."""
    from pathlib import Path

    from graphrl.cli.main import main

    full = Path(checkpoints["gpt2"])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in full.iterdir())
    rc = main(["run", "examples/grpo.py", "--lora", "policy:r=2", "--iterations", "1",
               "--save", str(full), "--overwrite"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "holds a full model" in line]
    assert rc == 2 and len(lines) == 1 and str(full) in lines[0], err
    assert "iteration" not in out and "reward" not in out
    assert sorted((p.name, p.stat().st_mtime_ns) for p in full.iterdir()) == before


def test_r_above_a_targets_smaller_side_and_llama_names_on_gpt2_are_refused(checkpoints):
    gpt2 = gr.ModelSpec.from_hf_config(read_config(checkpoints["gpt2"]))
    with pytest.raises(UsageError, match=r"'q_proj' is not a linear of a gpt2.*"
                                         r"did you mean 'c_attn'"):
        gr.LoRA(4, targets=("q_proj", "v_proj")).check(gpt2, "model policy")
    with pytest.raises(UsageError, match=r"'down_proj'.*did you mean 'c_proj'"):
        gr.LoRA(4, targets=("down_proj",)).check(gpt2, "model policy")
    with pytest.raises(UsageError, match=r"'lm_head'.*tied to its input embeddings"):
        gr.LoRA(4, targets=("c_attn", "lm_head")).check(gpt2, "model policy")
    with pytest.raises(UsageError, match=r"r=48 exceeds c_attn's smaller side 32"):
        gr.LoRA(48, targets=("c_attn",)).check(gpt2, "model policy")
    qwen3 = gr.ModelSpec.from_hf_config(read_config(checkpoints["qwen3"]))   # kv 2 x 16
    gr.LoRA(32, targets=("k_proj",)).check(qwen3, "model policy")
    with pytest.raises(UsageError, match=r"r=33 exceeds k_proj's smaller side 32"):
        gr.LoRA(33, targets=("k_proj",)).check(qwen3, "model policy")


def test_bf16_base_fp32_adapters_and_adam_on_gpt2(checkpoints):
    """The planned precision on GPT-2 (Conv1D targets): the base held bf16, adapters and
    AdamW state fp32, computing under bf16 autocast."""
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.precision import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16 kernels")
    path = checkpoints["gpt2"]
    e = HFEngine(lora_decl(path, "gpt2", precision="bf16"), {"checkpoint": path, "lr": LR},
                 seed=0)
    dtypes = {p.requires_grad: p.dtype for p in e.module.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    r = rollout(96)
    lp = e.forward(r)["logprobs"]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])[:, None] * r["response_mask"]
    e.train({"rollout": r, "old_logprobs": {"logprobs": lp}, "ref_logprobs": {"logprobs": lp},
             "advantages": {"advantages": adv}}, loss="grpo", clip=0.2, kl_coef=0.0)
    states = {t.dtype for s in e.optimizer.state.values() for k, t in s.items()
              if k in ("exp_avg", "exp_avg_sq")}
    assert states == {torch.float32} and e.ran_precision() == "bf16"
    assert {p.dtype for p in e.module.parameters() if not p.requires_grad} == {torch.bfloat16}
