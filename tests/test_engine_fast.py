"""The fast generation engine: greedy output identical to the HF engine's (Llama, GPT-2,
GQA, left-padded prompts, stop tokens), continuous batching identical to one-at-a-time
generation, slot reuse under a long-tailed length mix, the sampling distribution, and the
engine behind the local and Ray backends with the GRPO example learning."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

import graphrl as gr
from graphrl.backends.engines.fast import FastEngine
from graphrl.backends.engines.fast_sampling import uniforms
from graphrl.backends.engines.hf import HFEngine
from graphrl.backends.engines.registry import create_engine

FIELDS = ("tokens", "attention_mask", "response_mask", "row")


def decl(family: str = "llama", kv_heads: int = 4, vocab: int = 16) -> gr.ModelDecl:
    spec = gr.ModelSpec(family, vocab, 32, 2, 4, kv_heads, 64, 64, "lm", dtype="fp32")
    return gr.ModelDecl("m", spec, "policy", True, "fast")


def pair(d: gr.ModelDecl, **options):
    hf = HFEngine(d, {}, seed=0)
    fast = create_engine("fast", d, options, "cpu", 0)
    fast.load_weights(hf.export_weights())
    return hf, fast


def left_padded(n: int = 6, width: int = 7, vocab: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, width), generator=g)
    mask = torch.ones(n, width)
    for i in range(n):
        mask[i, :i % 4] = 0          # rows with 0..3 padding positions on the left
    return {"tokens": torch.where(mask.bool(), tokens, 0), "attention_mask": mask}


@pytest.mark.parametrize("family,kv", [("llama", 4), ("llama", 2), ("gpt2", 4)])
@pytest.mark.parametrize("stops", [(), (3, 7)])
def test_greedy_equals_hf(family, kv, stops):
    hf, fast = pair(decl(family, kv), slots=4)        # 12 rows through 4 slots
    p = left_padded()
    a = hf.generate(p, max_new_tokens=10, temperature=0, samples=2, stop_token_ids=stops)
    b = fast.generate(p, max_new_tokens=10, temperature=0, samples=2, stop_token_ids=stops)
    for k in FIELDS:
        assert torch.equal(a[k], b[k]), k
    if stops:
        assert (a["response_mask"].sum(1) < 10).any(), "no row stopped: the test is vacuous"


def test_weights_follow_training():
    """After a train step the fast engine generates with the new weights."""
    hf, fast = pair(decl())
    batch = {"tokens": torch.randint(0, 16, (8, 6))}
    ones = torch.ones(8, 6)
    inputs = {"rollout": {**batch, "response_mask": ones}, "old_logprobs": {"logprobs": ones * 0},
              "ref_logprobs": {"logprobs": ones * 0}, "advantages": {"advantages": ones}}
    for e in (hf, fast):
        e.train(inputs, loss="grpo", clip=0.2, kl_coef=0.0)
    p = left_padded()
    assert torch.equal(hf.generate(p, max_new_tokens=6, temperature=0)["tokens"],
                       fast.generate(p, max_new_tokens=6, temperature=0)["tokens"])


def test_continuous_batching_equals_one_at_a_time():
    """Sampled output: 2 slots over 12 sequences == each prompt generated alone (its
    rows' noise named by noise_rows), == all at once."""
    _, fast = pair(decl())
    p = left_padded()
    kw = dict(max_new_tokens=8, temperature=1.0, samples=2, seed=5, stop_token_ids=(2,))
    fast.slots = 2
    few = fast.generate(p, **kw)
    fast.slots = 64
    many = fast.generate(p, **kw)
    for k in FIELDS:
        assert torch.equal(few[k], many[k]), k
    for i in range(6):
        one = fast.generate({f: t[i:i + 1] for f, t in p.items()}, noise_rows=(2 * i, 12), **kw)
        assert torch.equal(one["tokens"], many["tokens"][2 * i:2 * i + 2])


def test_slots_are_reused_under_a_long_tailed_mix():
    """Two of 16 tokens stop a row: geometric (long-tailed) lengths. Freed
    slots take waiting sequences, so the decode steps stay well under what batches of
    `slots` sequences waiting for their longest member would take."""
    _, fast = pair(decl())
    fast.slots = 4
    p = {"tokens": torch.randint(4, 16, (8, 5), generator=torch.Generator().manual_seed(1))}
    out = fast.generate(p, max_new_tokens=48, temperature=1.5, samples=4, seed=3,
                        stop_token_ids=(0, 1))
    lengths = out["response_mask"].sum(1).long().tolist()
    assert max(lengths) >= 3 * (sum(lengths) / len(lengths)), "not long-tailed"
    static = sum(max(lengths[i:i + 4]) for i in range(0, 32, 4))
    steps = fast.last_stats["decode_steps"]
    assert fast.last_stats["prefills"] > 1 and max(lengths) - 1 <= steps < 0.6 * static, \
        (steps, static)
    # and every sequence ends exactly at its first stop token (or at the limit)
    for row, n in zip(out["tokens"][:, 5:].tolist(), lengths):
        assert all(t > 1 for t in row[:n - 1]) and (row[n - 1] <= 1 or n == 48)


def test_noise_is_uniform_and_independent():
    rows = torch.arange(20000)
    u = uniforms(7, rows, torch.zeros_like(rows))
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    assert abs(float(torch.histc(u.float(), 10, 0, 1).max()) / 20000 - 0.1) < 0.01
    other = uniforms(7, rows, torch.ones_like(rows))
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(torch.stack([u, uniforms(8, rows, rows * 0)]))[0, 1])) < 0.03


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0),
                                                     (1.3, 0, 0.8)])
def test_sampling_distribution(temperature, top_k, top_p):
    """Pearson's chi-square of 4000 first tokens against the model's filtered softmax:
    below the 99.9% quantile, and no token outside the top-k / nucleus."""
    hf, fast = pair(decl())
    p = {"tokens": torch.tensor([[3, 9, 4, 1]])}
    n = 4000
    out = fast.generate(p, max_new_tokens=1, samples=n, seed=11, temperature=temperature,
                        top_k=top_k, top_p=top_p)
    counts = torch.bincount(out["tokens"][:, -1], minlength=16).double()
    with torch.no_grad():
        logits = hf.module(input_ids=p["tokens"]).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, -1)
    from graphrl.backends.engines.hf import filter_probs

    probs = filter_probs(probs[None], top_k, top_p)[0]
    probs = probs / probs.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0
    expected = probs[keep] * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum().detach())
    df = int(keep.sum()) - 1
    # chi-square 99.9% quantiles (Wilson-Hilferty approximation, Wilson & Hilferty 1931)
    z = 3.09
    bound = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    assert chi2 < bound, (chi2, bound, df)


def test_bad_input_is_a_clear_error():
    with pytest.raises(gr.UsageError, match="slots >= 1"):
        FastEngine(decl(), {"slots": 0})
    _, fast = pair(decl())
    with pytest.raises(gr.UsageError, match="prompt row 1 has no real token"):
        fast.generate({"tokens": torch.ones(2, 3, dtype=torch.long),
                       "attention_mask": torch.tensor([[1., 1, 1], [0, 0, 0]])},
                      max_new_tokens=2)
    with pytest.raises(gr.UsageError, match="exceed the model's 64"):
        fast.generate({"tokens": torch.ones(1, 60, dtype=torch.long)}, max_new_tokens=8)
    with pytest.raises(gr.UsageError, match="unknown engine 'nope'.*hf, megatron, deepspeed, fast"):
        create_engine("nope", decl(), {}, "cpu", 0)


def fast_grpo(batch: int, seed: int, prepare: bool = True, precision: str | None = None):
    """The GRPO example with its policy generating on the fast engine."""
    from conftest import load_build

    exp = load_build("grpo")(gr.RunOptions(batch_size=batch, seed=seed, precision=precision))
    models = tuple(dataclasses.replace(m, engine="fast") if m.name == "policy" else m
                   for m in exp.models)
    return dataclasses.replace(exp, models=models, prepare=exp.prepare if prepare else None)


def test_grpo_example_learns_with_the_fast_engine(reward_models):
    from conftest import shared_prepare
    from graphrl.runner import run_experiment

    opts = gr.RunOptions(seed=11, quiet=True)
    exp = shared_prepare(fast_grpo(16, 11), reward_models, 11)   # trained once a session
    summary = run_experiment(exp, opts, out=io.StringIO())
    first, last = summary.reward_window(True), summary.reward_window(False)
    assert last - first >= 0.15, (first, last)


def test_ray_backend_runs_the_fast_engine(shared_ray):
    """Same sampled rollouts on Ray (generation on its own replicas) as locally (in
    fp32: an exact comparison; in bf16 Ray's generation copy holds bf16 weights while
    the local policy generates under autocast over its fp32 weights)."""
    pytest.importorskip("ray")
    from graphrl.backends.local import LocalExecutor
    from graphrl.backends.ray.executor import RayExecutor
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph
    from graphrl.runner import run_experiment

    exp = fast_grpo(4, 0, prepare=False, precision="fp32")
    plan = compile_graph(exp.program().graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement={"policy.generate": {"gpus": "2-3"}}).plan
    shared_ray.session()
    ray_ex = RayExecutor(exp.program(), plan, seed=0, timeout_s=60.0,
                         env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        opts = gr.RunOptions(iterations=2, seed=0, batch_size=4, quiet=True)
        ray = run_experiment(exp, opts, out=io.StringIO(), executor=ray_ex)
        spec = ray_ex.engines.specs[ray_ex.engines.gen_engine["policy"]]
        assert spec.decl.engine == "fast"
    finally:
        ray_ex.close()
    local = run_experiment(exp, opts, out=io.StringIO(),
                           executor=LocalExecutor(exp.program(), seed=0))
    assert [r["reward_mean"] for r in ray.rows] == [r["reward_mean"] for r in local.rows]
