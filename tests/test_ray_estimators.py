"""The Ray executor runs the DAPO and ReMax examples as the local backend does: DAPO's
kept batch varies per iteration after dynamic sampling (the forward and the
data-parallel train split the rows they really get), ReMax's two generate calls run on
the generation mesh. Same seed, same samples: identical task scores and kept batches."""
from __future__ import annotations

import dataclasses
import io

import pytest

pytest.importorskip("ray")
pytest.importorskip("torch")

import graphrl as gr  # noqa: E402
from conftest import load_build  # noqa: E402
from graphrl.backends.local import LocalExecutor  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.runner import run_experiment  # noqa: E402

PLACEMENT = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3},
             "policy.generate": {"gpus": "2-3"}}
ITERATIONS, SEED = 3, 0


def runs(example: str, batch: int):
    from graphrl.backends.ray.executor import RayExecutor

    exp = load_build(example)(gr.RunOptions(batch_size=batch, seed=SEED, precision="fp32"))
    exp = dataclasses.replace(exp, prepare=None)   # same untrained reward model both sides
    opts = gr.RunOptions(iterations=ITERATIONS, seed=SEED, batch_size=batch, quiet=True)
    plan = compile_graph(exp.program().graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=PLACEMENT).plan
    ray_ex = RayExecutor(exp.program(), plan, seed=SEED, timeout_s=120.0,
                         env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        remote = run_experiment(exp, opts, out=io.StringIO(), executor=ray_ex)
    finally:
        ray_ex.close()
    local = run_experiment(exp, opts, out=io.StringIO(),
                           executor=LocalExecutor(exp.program(), seed=SEED))
    return remote.rows, local.rows


def test_dapo_variable_batch_on_ray(ray_session):
    remote, local = runs("dapo", 8)   # 16 prompts generated, at most 8 groups kept
    for r, l in zip(remote, local, strict=True):
        assert r["reward_mean"] == l["reward_mean"]
        assert r["tokens/response"] == l["tokens/response"]
        assert r["policy_stats/loss"] == pytest.approx(l["policy_stats/loss"], rel=1e-4,
                                                       abs=1e-6)
    kept = [r["tokens/response"] / 8 for r in remote]   # rows: 8 tokens a response
    assert all(k % 4 == 0 and k <= 8 * 4 for k in kept) and len(set(kept)) > 1, kept


def test_remax_two_generates_on_ray(ray_session):
    remote, local = runs("remax", 4)
    for r, l in zip(remote, local, strict=True):
        assert r["reward_mean"] == l["reward_mean"]
        assert r["greedy_score/score_mean"] == pytest.approx(l["greedy_score/score_mean"],
                                                             rel=1e-5)
        assert "seconds/policy.generate" in r
