"""Asynchronous steps on Ray (one run): generation on GPUs 0-1, every other call on 2-3,
so step n's generation (streamed: head, push, tail) overlaps step n-1's training; the
answers equal the local backend's async run (the same tolerances as
tests/test_ray_executor.py: identical samples and versions, losses to 1e-5) and each
sample's policy version is recorded."""
from __future__ import annotations

import dataclasses
import io

import pytest

pytest.importorskip("ray")
torch = pytest.importorskip("torch")

import graphrl as gr  # noqa: E402
from conftest import load_build  # noqa: E402
from graphrl.backends.local import LocalExecutor  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.runner import run_experiment  # noqa: E402

POOLS = {"policy.generate": {"gpus": "0-1"}, "policy.train": {"gpus": "2-3", "dp": 2, "zero": 3},
         "reference.forward": {"gpus": "2-3"}, "reward.forward": {"gpus": "2-3"}}
ITERATIONS, BATCH, SEED = 3, 4, 0


def with_stops(exp, stops=(2, 3, 4, 5, 6)):
    """`exp` whose generation also stops at `stops` (responses of varied lengths, so some
    groups finish within the head: graphrl/stream_train.py) and whose train takes one
    optimizer pass (so it starts on the head part too)."""
    from graphrl.passes.staleness import carry_rollouts, verify_staleness

    class Stopping(type(exp)):
        def program(self, staleness=0):
            p = super().program(0)
            g = p.graph
            for n in g.nodes:
                attrs = dict(n.attrs)
                if n.target == "generate":
                    attrs["stop_token_ids"] = stops
                if n.target == "train":
                    attrs.update(epochs=1, minibatches=1)
                g = g.replace_node(n.name, dataclasses.replace(
                    n, attrs=tuple(sorted(attrs.items()))))
            if staleness:
                g = verify_staleness(carry_rollouts(g, staleness), staleness)
            return dataclasses.replace(p, graph=g)
    return Stopping(**{f.name: getattr(exp, f.name) for f in dataclasses.fields(exp)})


def test_ray_async_run_equals_local(ray_session):
    from graphrl.backends.ray.executor import RayExecutor

    exp = with_stops(dataclasses.replace(load_build("grpo")(gr.RunOptions(
        batch_size=BATCH, seed=SEED, precision="fp32")), prepare=None))   # exact comparison
    program = exp.program(1)
    plan = compile_graph(program.graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=POOLS).plan
    gen = plan.graph.node("%rollout")
    assert gen.placement.mesh.gpus == (0, 1)
    assert all(set(n.placement.mesh.gpus) == {2, 3} for n in plan.graph.calls() if n is not gen)
    opts = gr.RunOptions(iterations=ITERATIONS, seed=SEED, batch_size=BATCH, quiet=True,
                         staleness=1)
    ex = RayExecutor(program, plan, seed=SEED, timeout_s=180.0, env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        ray_summary = run_experiment(exp, opts, out=io.StringIO(), executor=ex)
    finally:
        ex.close()
    local = run_experiment(exp, opts, out=io.StringIO(),
                           executor=LocalExecutor(exp.program(1), seed=SEED))
    assert [r["iteration"] for r in ray_summary.rows] == [1, 2, 3]
    for r, l in zip(ray_summary.rows, local.rows, strict=True):
        assert r["reward_mean"] == l["reward_mean"]          # identical samples
        assert r["rollout_version_prev/version_mean"] == l["rollout_version_prev/version_mean"]
        for key in ("policy_stats/loss", "policy_stats/kl", "policy_stats/behaviour_weight"):
            assert r[key] == pytest.approx(l[key], rel=1e-5, abs=1e-6), key
    assert [r["rollout_version_prev/version_mean"] for r in ray_summary.rows] == [0, 0, 1]
    # generation (GPUs 0-1) ran while the training pool (2-3) scored and trained on the
    # previous step's rollouts
    step = [e for e in ray_summary.events if e.iteration == 2 and "reshard" not in e.call]
    gens = [e for e in step if e.call == "policy.generate"]
    others = [e for e in step if e.worker in ("gpu2", "gpu3")]
    assert {e.worker for e in gens} == {"gpu0", "gpu1"} and others
    assert min(e.start for e in gens) < max(e.end for e in others)
    assert min(e.start for e in others) < max(e.end for e in gens)
    # streamed (backends/stream_generation.py): per generation rank a head, its
    # head-finished groups, a tail and the behaviour log-probs; the weights are pushed
    # once, after the train (the plan's reshard at the step's start is skipped: the
    # previous tail pushed them)
    assert sorted(e.worker for e in gens) == ["gpu0"] * 4 + ["gpu1"] * 4
    trains = sorted((e for e in step if e.call == "policy.train"), key=lambda e: e.start)
    train_end = max(next(e for e in trains if e.worker == w).end for w in ("gpu2", "gpu3"))
    pushes = [e for e in ray_summary.events if e.iteration == 2 and "reshard" in e.call]
    assert pushes and all(e.end >= train_end - 0.05 for e in pushes)
    # streamed scoring and training (graphrl/stream_train.py): the forwards and the train
    # of step 3 started on batch 2's head-finished groups in step 2, after its train
    # (the first on each rank) and push, beside its tail
    split = {n.name for n in plan.graph.calls() if n.attr("head_part")}
    assert split == {"%policy_logprobs", "%reference_logprobs", "%rm_score", "%policy@1"}
    early = [e for e in others if e.node in split and e.start >= train_end]
    assert {e.node for e in early} == split
