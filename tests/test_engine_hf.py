"""The Hugging Face engine: generation, heads, training, weights and offload."""
from __future__ import annotations

import pytest
import torch

import graphrl as gr
from graphrl.backends.engines.hf import HFEngine


def tiny(family: str = "llama", head: str = "lm", precision: str = "fp32",
         trainable: bool = True) -> gr.ModelDecl:
    """Exact comparisons run in fp32 (bf16 ones say so: tests/test_precision.py)."""
    spec = gr.ModelSpec(family, 16, 32, 1, 2, 2, 64, 32, head, dtype=precision)
    return gr.ModelDecl("m", spec, "policy", trainable)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_is_seeded_and_shaped(family):
    e = HFEngine(tiny(family), {}, seed=0)
    prompts = {"tokens": torch.randint(0, 16, (3, 5))}
    a = e.generate(prompts, max_new_tokens=4, samples=2, seed=7)
    b = e.generate(prompts, max_new_tokens=4, samples=2, seed=7)
    assert a["tokens"].shape == (6, 9) and torch.equal(a["tokens"], b["tokens"])
    assert torch.equal(a["tokens"][:, :5], prompts["tokens"].repeat_interleave(2, 0))
    assert a["response_mask"][:, 5:].eq(1).all() and a["response_mask"][:, :5].eq(0).all()


def test_logprobs_match_a_full_forward():
    e = HFEngine(tiny(), {}, seed=0)
    r = e.generate({"tokens": torch.randint(0, 16, (2, 4))}, max_new_tokens=3, seed=1)
    lp = e.forward(r)["logprobs"]
    logits = e.module(input_ids=r["tokens"]).logits
    want = torch.log_softmax(logits[0, 3], -1)[r["tokens"][0, 4]]
    assert lp.shape == (2, 7) and lp[:, 0].eq(0).all()
    assert torch.allclose(lp[0, 4], want, atol=1e-5)


@pytest.mark.parametrize("head,field,shape", [("value", "values", (2, 6)),
                                               ("score", "score", (2,))])
def test_scalar_heads(head, field, shape):
    e = HFEngine(tiny("gpt2", head), {}, seed=0)
    out = e.forward({"tokens": torch.randint(0, 16, (2, 6))})
    assert set(out) == {field} and out[field].shape == shape


def test_train_lowers_the_loss_and_bumps_the_version():
    e = HFEngine(tiny(head="score"), {"lr": 3e-3}, seed=0)
    chosen = {"tokens": torch.full((32, 6), 12)}
    rejected = {"tokens": torch.full((32, 6), 3)}
    first = e.train({"chosen": chosen, "rejected": rejected}, loss="bradley_terry", seed=0)
    for _ in range(5):
        last = e.train({"chosen": chosen, "rejected": rejected}, loss="bradley_terry", seed=0)
    assert last["loss"] < first["loss"] and e.version == 6


def test_weights_export_load_and_offload_round_trip():
    a, b = HFEngine(tiny(), {}, seed=0), HFEngine(tiny(), {}, seed=1)
    w = a.export_weights()
    assert any(not torch.equal(w[k], v) for k, v in b.export_weights().items())
    b.load_weights(w)
    assert all(torch.equal(w[k], v) for k, v in b.export_weights().items())
    b.offload()
    b.onload()
    assert all(torch.equal(w[k], v) for k, v in b.export_weights().items())
    with pytest.raises(gr.UsageError, match="weights do not match"):
        b.load_weights({"nope": torch.zeros(1)})


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(gr.UsageError, match="CUDA is not available"):
        HFEngine(tiny(), {}, device="cuda")
