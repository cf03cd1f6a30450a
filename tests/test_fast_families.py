"""The fast engine on every model family (graphrl.families.TINY: Llama-2, Llama-3.x with
rope_type llama3, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norm and head_dim !=
hidden / heads, GPT-2) and on the features a family's variants add (attention/MLP biases,
sliding windows), each from a random checkpoint directory, against Hugging Face's own
module: greedy generation equal to the HF engine's (left-padded prompts of different
lengths, prompt + new tokens crossing the llama3 scaling's wavelengths); the decode
model's next-token log-probs at every generated position and the engine's forward
log-probs equal HF's log-softmax within 1e-5 (float32); one GRPO step as the HF
engine's. Refusals name the model, the engine and the field."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphrl as gr
from graphrl.backends.engines.fast import compact_left
from graphrl.backends.engines.fast_model import rope_inv_freq
from graphrl.backends.engines.hf import HFEngine, positions
from graphrl.backends.engines.registry import create_engine
from graphrl.families import TINY, save_random_checkpoint

VARIANTS = {
    **TINY,
    # biases on every Llama projection (attention_bias: q/k/v/o; mlp_bias)
    "llama_bias": dict(TINY["llama2"], attention_bias=True, mlp_bias=True),
    # Mistral v0.1 style: a sliding window shorter than the generated rows
    "mistral_window": dict(TINY["mistral"], sliding_window=8),
    # Qwen2 sliding window on the layers from max_window_layers on (layer 1 of 2)
    "qwen2_window": dict(TINY["qwen2"], use_sliding_window=True, sliding_window=8,
                         max_window_layers=1),
}
FUSED = {"llama2", "llama3", "mistral", "qwen2", "qwen3", "llama_bias"}   # fast_forward
PROMPT, NEW = 14, 70          # positions up to 84: well past original_max_position (16)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {name: str(save_random_checkpoint(cfg, root / name, seed=i))
            for i, (name, cfg) in enumerate(VARIANTS.items())}


def decl(name: str, precision: str = "fp32") -> gr.ModelDecl:
    """fp32 unless asked (the 1e-5 comparisons are exact-function checks)."""
    family = "gpt2" if name == "gpt2" else "llama"
    spec = gr.ModelSpec(family, 96, 32, 2, 4, 4 if family == "gpt2" else 2, 64, 128, "lm",
                        dtype=precision)
    return gr.ModelDecl("m", spec, "policy", True, "fast")


def engines(path: str, name: str, precision: str = "fp32"):
    hf = HFEngine(decl(name, precision), {"checkpoint": path}, seed=0)
    fast = create_engine("fast", decl(name, precision), {"checkpoint": path, "slots": 4},
                         "cpu", 0)
    return hf, fast


def prompts(n: int = 6):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 96, (n, PROMPT), generator=g)
    mask = torch.ones(n, PROMPT)
    for i in range(n):
        mask[i, :(3 * i) % 11] = 0       # 0..9 padding positions on the left
    return {"tokens": torch.where(mask.bool(), tokens, 0), "attention_mask": mask}


def hf_logprobs(module, tokens, mask) -> torch.Tensor:
    """log-softmax [B, T, V] of Hugging Face's own module on left-padded rows."""
    mask = mask.long()
    with torch.no_grad():
        logits = module(input_ids=tokens, attention_mask=mask, position_ids=positions(mask),
                        use_cache=False).logits
    return torch.log_softmax(logits.float(), -1)


def decode_logprobs(fast, out) -> torch.Tensor:
    """The decode model's next-token log-softmax [B, NEW, V] over a generated batch:
    prefill of each compacted prompt, then one decode step per generated token."""
    tokens, mask = out["tokens"], out["attention_mask"].long()
    lens = mask[:, :PROMPT].sum(1)
    n = tokens.shape[0]
    lm = fast._decoder(n, PROMPT + NEW)
    steps = [lm.prefill(compact_left(tokens[:, :PROMPT], mask[:, :PROMPT]), lens,
                        torch.arange(n))]
    for j in range(NEW - 1):
        pos = lens + j
        steps.append(lm.decode(tokens[:, PROMPT + j], pos, int(pos.max()) + 1))
    return torch.log_softmax(torch.stack(steps, 1), -1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_family_matches_hf(checkpoints, name):
    hf, fast = engines(checkpoints[name], name)
    assert fast.fused_forward == (name in FUSED)
    p = prompts()
    a = hf.generate(p, max_new_tokens=NEW, temperature=0)
    b = fast.generate(p, max_new_tokens=NEW, temperature=0)
    for k in ("tokens", "attention_mask", "response_mask"):
        assert torch.equal(a[k], b[k]), k
    tokens, mask = b["tokens"], b["attention_mask"]
    ref = hf_logprobs(hf.module, tokens, mask)
    # the decode model's distribution of every generated token
    dec = decode_logprobs(fast, b)
    assert (dec - ref[:, PROMPT - 1:-1]).abs().max() < 1e-5
    # the engine's forward (fast_forward, or HF's for the others)
    lp = fast.forward({"tokens": tokens, "attention_mask": mask})["logprobs"]
    picked = F.pad(ref[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0], (1, 0))
    keep = (mask * F.pad(mask[:, :-1], (1, 0))) > 0
    assert (lp - picked)[keep].abs().max() < 1e-5
    # one GRPO step, the shared prompts of a group running once in fast_forward
    start = hf.export_weights()
    rollout = {"tokens": tokens.repeat_interleave(2, 0)[:8, :PROMPT + 12],
               "attention_mask": mask.repeat_interleave(2, 0)[:8, :PROMPT + 12]}
    rollout["response_mask"] = rollout["attention_mask"].clone()
    rollout["response_mask"][:, :PROMPT] = 0
    rollout["response_mask"][::3, PROMPT + 8:] = 0          # some responses end early
    inputs = {"rollout": rollout,
              "ref_logprobs": {"logprobs": torch.zeros(8, PROMPT + 12) - 3.0},
              "advantages": {"advantages": torch.linspace(-1, 1, 8)[:, None]
                             .expand(8, PROMPT + 12)}}
    s1 = hf.train(inputs, loss="grpo", seed=0, kl_coef=0.1)
    s2 = fast.train(inputs, loss="grpo", seed=0, kl_coef=0.1)
    assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-5)
    wa, wb = hf.export_weights(), fast.export_weights()
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa]).norm()
    moved = torch.cat([(wa[k] - start[k]).flatten() for k in wa]).norm()
    assert diff < 1e-3 * moved, (float(diff), float(moved))


@pytest.mark.parametrize("name", ["llama2", "llama3", "qwen3"])
def test_rotary_frequencies_equal_hf(checkpoints, name):
    """rope_inv_freq (default and Llama 3.1 scaling) == the HF module's own buffer, and
    the llama3 checkpoint's scaling moves some frequencies (not a vacuous check)."""
    hf = HFEngine(decl(name), {"checkpoint": checkpoints[name]}, seed=0)
    cfg = hf.module.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ours = rope_inv_freq(cfg, d)
    assert torch.equal(ours, hf.module.model.rotary_emb.inv_freq.float())
    if name == "llama3":
        plain = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2) / d))
        assert not torch.allclose(ours, plain.float())


@pytest.mark.parametrize("change,field", [
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0)),
     "rope_type=linear"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0,
                               original_max_position_embeddings=32)), "rope_type=yarn"),
    (dict(hidden_act="gelu"), "activation=gelu"),
])
def test_unsupported_features_are_refused(tmp_path, change, field):
    path = save_random_checkpoint(dict(TINY["llama2"], **change), tmp_path / "m")
    with pytest.raises(gr.UsageError, match=f"model m: engine fast .*{field}"):
        create_engine("fast", decl("llama2"), {"checkpoint": str(path)}, "cpu", 0)


# bf16 fused forward on the families' random checkpoints (scale 0.2: larger logits than the
# other tests' models, so larger bf16 rounding): measured max |Δ log-prob| vs fp32 3.9e-2
# to 6.7e-2 (HF bf16 autocast vs fp32: 4.9e-2 to 7.4e-2), vs HF bf16 4.8e-2 to 8.6e-2;
# gradient relative error (all parameters) vs fp32 1.7e-2 to 2.1e-2 (HF autocast:
# 1.8e-2 to 2.6e-2), vs HF bf16 2.1e-2 to 3.1e-2.
@pytest.mark.parametrize("name", sorted(FUSED))
def test_family_fused_bf16_is_as_close_to_fp32_as_autocast(checkpoints, name):
    from graphrl.backends.engines.fast_forward import fast_logprobs

    path = checkpoints[name]
    h16 = HFEngine(decl(name, "bf16"), {"checkpoint": path}, seed=0)
    h32 = HFEngine(decl(name), {"checkpoint": path}, seed=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 96, (6, 20), generator=g)
    att = torch.ones(6, 20)
    att[1::2, :4] = 0
    tokens = torch.where(att.bool(), tokens, 0)
    keep = (att * F.pad(att[:, :-1], (1, 0))) > 0
    w = torch.linspace(-1, 1, int(keep.sum()))

    def run(fn, module):
        module.zero_grad()
        out = fn()
        (out[keep] * w).sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in module.parameters()])

    fused, gf = run(lambda: fast_logprobs(h16.module, tokens, att.long(),
                                          positions(att.long()), None, torch.bfloat16),
                    h16.module)
    auto, ga = run(lambda: h16._head({"tokens": tokens, "attention_mask": att}), h16.module)
    ref, gr32 = run(lambda: h32._head({"tokens": tokens, "attention_mask": att}), h32.module)
    assert fused.dtype == gf.dtype == torch.float32
    gap = float((fused - ref)[keep].abs().max())
    assert 0 < gap < 1e-1 and gap < 1.5 * float((auto - ref)[keep].abs().max())
    assert float((fused - auto)[keep].abs().max()) < 1.5e-1

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert 0 < rel(gf, gr32) < 5e-2 and rel(gf, gr32) < 1.5 * rel(ga, gr32)
    assert rel(gf, ga) < 6e-2
