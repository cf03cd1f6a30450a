"""Asynchronous off-policy steps (--staleness K): the graph rewrite and its invariants,
the staleness-corrected loss, the local backend's semantics, and the async pricing."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import graphrl as gr
from conftest import load_build
from graphrl.backends.local import LocalExecutor
from graphrl.errors import GraphError, UsageError
from graphrl.parser import parse_graph
from graphrl.passes.staleness import carry_rollouts, queue_delays, verify_staleness


@pytest.fixture(scope="module")
def grpo():
    return load_build("grpo")(gr.RunOptions(batch_size=2))


@pytest.mark.parametrize("k", [1, 2])
def test_rewrite_carries_rollouts_k_steps(grpo, k):
    g = grpo.program().graph
    h = verify_staleness(carry_rollouts(g, k), k)
    assert parse_graph(h.text()) == h
    gen = h.node("%rollout")
    assert gen.attr("behaviour") is True and gen.inputs[0] == "%policy@gen"
    assert [v.spec.kind for v in gen.outputs] == ["Rollout", "LogProbs", "Versions"]
    # generation has no consumer inside the step: it can overlap the trainers
    assert not any(set(n.inputs) & {v.name for v in gen.outputs}
                   for n in h.nodes if n is not gen)
    last = "%rollout_prev" if k == 1 else f"%rollout_prev{k}"
    train = h.node("%policy@1")
    assert train.attr("loss") == "grpo_decoupled" and train.attr("staleness") == k
    assert last in train.inputs and queue_delays(h)[last] == k
    assert ("%policy@gen", "%policy@1") in h.carries and ("%rollout_prev", "%rollout") in h.carries
    # the prompts are read only by generation: they are not queued
    assert not any(v.name.startswith("%prompts_prev") for v in h.inputs)
    assert carry_rollouts(g, 0) is g


def test_verify_catches_reads_past_the_bound_and_mixed_ages(grpo):
    h = carry_rollouts(grpo.program().graph, 2)
    with pytest.raises(GraphError, match="over the staleness bound 1"):
        verify_staleness(h, 1)
    adv = h.node("%advantages")   # reads the rollout and its scores (2 steps old)
    mixed = h.replace_node(adv.name, dataclasses.replace(
        adv, inputs=("%rollout_prev",) + adv.inputs[1:]))
    with pytest.raises(GraphError, match="mixes inputs of different steps"):
        verify_staleness(mixed, 2)
    score = h.node("%task_score")
    early = h.replace_node(score.name, dataclasses.replace(score, inputs=("%rollout",)))
    with pytest.raises(GraphError, match="generation cannot overlap"):
        verify_staleness(early, 2)


def test_rewrite_refusals(grpo):
    g = grpo.program().graph
    with pytest.raises(UsageError, match="already rewritten"):
        carry_rollouts(carry_rollouts(g, 1), 1)
    with pytest.raises(UsageError, match="int >= 0"):
        carry_rollouts(g, -1)
    frozen = dataclasses.replace(g, models=tuple(dataclasses.replace(m, trainable=False)
                                                 for m in g.models))
    with pytest.raises(UsageError, match="no generate call on a trained model"):
        carry_rollouts(frozen, 1)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(8, 6, generator=g) > 0.2).float()
    lp = lambda: -torch.rand(8, 6, generator=g)  # noqa: E731
    return {"rollout": {"response_mask": mask}, "old_logprobs": {"logprobs": lp()},
            "behaviour_logprobs": {"logprobs": lp()}, "ref_logprobs": {"logprobs": lp()},
            "advantages": {"advantages": torch.randn(8, 6, generator=g)},
            "versions": {"version": torch.zeros(8, dtype=torch.int64)}}


def test_decoupled_loss_is_ppo_on_fresh_samples_and_truncates_stale_weights():
    from graphrl.backends.losses import grpo, grpo_decoupled, ppo, ppo_decoupled

    mb = _batch()
    new = torch.log(torch.rand(8, 6, generator=torch.Generator().manual_seed(1)))
    fresh = dict(mb, behaviour_logprobs=mb["old_logprobs"])
    for plain, decoupled in ((ppo, ppo_decoupled), (grpo, grpo_decoupled)):
        a = new.clone().requires_grad_()
        b = new.clone().requires_grad_()
        la, _ = plain(lambda r: a, fresh, clip=0.2)
        lb, stats = decoupled(lambda r: b, fresh, clip=0.2, behaviour_clip=2.0)
        la.backward(), lb.backward()
        assert torch.allclose(la, lb) and torch.allclose(a.grad, b.grad)
        assert stats["behaviour_weight"] == pytest.approx(1.0)
    # stale: each token weighted by min(pi_prox / pi_behav, cap) (AReaL eq. 5)
    x = new.clone().requires_grad_()
    loss, stats = ppo_decoupled(lambda r: x, mb, clip=0.2, behaviour_clip=1.1)
    w = torch.exp(mb["old_logprobs"]["logprobs"] - mb["behaviour_logprobs"]["logprobs"])
    ratio = torch.exp(new - mb["old_logprobs"]["logprobs"])
    adv, mask = mb["advantages"]["advantages"], mb["rollout"]["response_mask"]
    surr = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    want = -(w.clamp(max=1.1) * surr * mask).sum() / mask.sum()
    assert torch.allclose(loss, want)
    assert stats["behaviour_clip_fraction"] == pytest.approx(
        float(((w > 1.1).float() * mask).sum() / mask.sum()))


def test_local_async_semantics(grpo):
    """Step 0 only generates; step n trains on step n-1's rollouts, generated by the
    weights of the step before; a rerun is identical."""
    program = grpo.program(1)

    def run(steps):
        ex = LocalExecutor(program, seed=3)
        out = [ex.run_step(grpo.data(i), iteration=i) for i in range(steps)]
        return ex, out
    ex, out = run(4)   # warm-up, then versions 0, 0, 1
    # (generation streams: its head and its tail are two events)
    assert out[0].warmup and [e.call for e in out[0].events] == ["policy.generate"] * 2
    assert out[0].outputs == {}
    assert not any(r.warmup for r in out[1:])
    versions = [int(r.outputs["rollout_version_prev"]["version"].unique()) for r in out[1:]]
    assert versions == [0, 0, 1]   # step 1's generation still read version 0
    assert ex.engines["policy"].version == 3
    _, again = run(3)
    for a, b in zip(out[1:3], again[1:]):
        for name in a.outputs:
            for f, t in a.outputs[name].items():
                assert torch.equal(t, b.outputs[name][f]), (name, f)


def test_train_refuses_samples_past_the_bound(grpo):
    from graphrl.backends.async_steps import check_versions
    from graphrl.errors import ExecutionError

    train = grpo.program(1).graph.node("%policy@1")
    versions = {"versions": {"version": torch.tensor([3, 4])}}
    assert check_versions(train, versions, 4, 1) == {"lag_min": 0.0, "lag_max": 1.0}
    with pytest.raises(ExecutionError, match="staleness bound is 1"):
        check_versions(train, versions, 5, 1)


def test_run_reports_trained_steps_only(grpo, tmp_path):
    from graphrl.runner import run_experiment

    metrics = tmp_path / "m.jsonl"
    opts = gr.RunOptions(iterations=2, quiet=True, staleness=1, metrics=str(metrics))
    exp = dataclasses.replace(grpo, prepare=None)
    summary = run_experiment(exp, opts)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(summary.rows) == 2 and [r["iteration"] for r in rows] == [1, 2]
    assert rows[0]["rollout_version_prev/version_mean"] == 0.0
    assert "policy_stats/behaviour_weight" in rows[0]


def test_compile_chooses_async_only_when_it_pays(root):
    from graphrl.cli.compile import async_row
    from graphrl.compiler import compile_graph
    from graphrl.lengths import parse as parse_lengths
    from graphrl.placement_file import cluster_of

    small = load_build("grpo")(gr.RunOptions(batch_size=4)).program().graph
    c = compile_graph(small, cluster_of("1x4xcpu"), "colocate-all", staleness=1)
    assert c.findings["staleness"] == 0 and c.findings["async"] is not None
    assert c.plan.predicted_step_seconds == c.findings["sync_seconds"]
    # reasoning-style long tail on 16 H100: the executors stream generation (head and
    # tail around the push), priced as they run it (above the ideal stream, below sync)
    big = load_build("grpo")(gr.RunOptions(model_size="7b-64k", prompt_len=1024,
                                           response_len=16384, batch_size=64)).program().graph
    tail = parse_lengths("lognormal:mean=3072,max=16384")
    row = async_row(big, cluster_of("2x8xH100"), "graph", tail, None, 1)
    assert row["staleness"] == 1 and row["split"] == "8+8", row
    # priced before lowering as the executors run it; the lowered plan may also start
    # calls on the head part (stream_train), so it may be faster than priced
    assert row["async_bound"] <= min(row["streamed_step_seconds"], row["step_seconds"])
    assert row["step_seconds"] == pytest.approx(row["streamed_step_seconds"], rel=0.1)
    assert row["chosen"] and row["mode"] == "async" and row["sync_seconds"] > row["step_seconds"]
    sync = compile_graph(big, cluster_of("2x8xH100"), "auto", gen_engine="graph",
                         response_lengths=tail).plan.predicted_step_seconds
    assert row["step_seconds"] < sync
    # streamed scoring (graphrl/stream_train.py): the row names what waits and why
    assert "more than one optimizer pass" in row["head_part"]["waits"]["%policy@1"]
    # 2k-token responses, batch 256: the lowered async plan beats the synchronous one
    mid = load_build("grpo")(gr.RunOptions(model_size="7b", prompt_len=512, response_len=2048,
                                           batch_size=256)).program().graph
    c = compile_graph(mid, cluster_of("2x8xH100"), "auto", gen_engine="graph",
                      response_lengths=parse_lengths("fixed:2048"), staleness=1)
    f = c.findings
    assert f["staleness"] == 1 and f["async"].step_seconds < f["sync_seconds"]
    assert c.plan.predicted_step_seconds == f["async_lowered_seconds"] < f["sync_seconds"]
    # every response 2048 tokens: no group finishes in the head, so no forward starts
    # early (the marks are removed, the plan says why)
    assert f["stream_split"].calls == () and not any(
        n.attr("head_part") for n in c.plan.graph.nodes)
    assert "would not shorten" in dict(f["stream_split"].refused)["%rm_score"]
    # a two-part train keeps its head part's gradient until the rest arrives: where its
    # GPUs cannot also hold that copy (7b, ZeRO-1 on 8 GPUs: 12.6 GiB beside 68 GiB in
    # use), it takes the batch in one call
    from copy import copy

    from graphrl.passes.price_stream import no_room_for_gradient_copy

    train = next(n.name for n in c.plan.graph.nodes if n.target == "train")
    assert "gradient copy" in no_room_for_gradient_copy(c.plan, (train,), c.problem)[train]
    roomy = copy(c.problem)
    roomy.capacity = 2 * roomy.capacity
    assert no_room_for_gradient_copy(c.plan, (train,), roomy) == {}
    gen = c.graph.node("%rollout")    # the plan runs the rewritten graph on the two pools
    pool = set(range(f["async"].gen_gpus))
    assert set(gen.placement.mesh.gpus) == pool
    assert all(not pool & set(n.placement.mesh.gpus) for n in c.graph.calls() if n is not gen)
