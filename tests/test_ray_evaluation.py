"""Evaluation on the Ray backend: the GRPO example with --eval-every 2 run as a compiled
plan (policy.train FSDP on GPUs 0-1, generation on 2-3: the eval generate reads the
trained weights through its own reshard, which runs only at evaluating steps) gives the
local backend's eval rows. fp32 and no reward-model pre-training, as in
test_ray_executor.py (whose docstring explains why samples are identical)."""
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

PLACEMENT = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3},
             "policy.generate": {"gpus": "2-3"}}
OPTS = dict(iterations=2, seed=0, batch_size=4, quiet=True, eval_every=2, eval_samples=2,
            eval_greedy=True)


def test_ray_eval_rows_match_local(ray_session):
    from graphrl.backends.ray.executor import RayExecutor

    exp = load_build("grpo")(gr.RunOptions(precision="fp32", **OPTS))
    exp = dataclasses.replace(exp, prepare=None)
    plan = compile_graph(exp.program().graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=PLACEMENT).plan
    evals = [n for n in plan.graph.nodes if n.attr("eval_every") == 2]
    assert [n.call for n in evals if n.target == "reshard"] == ["reshard[policy]"]
    ex = RayExecutor(exp.program(), plan, seed=0, timeout_s=120.0,
                     env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        ray_rows = run_experiment(exp, gr.RunOptions(**OPTS), out=io.StringIO(),
                                  executor=ex).rows
        iterations = [r.iteration for r in ex.reshards]
    finally:
        ex.close()
    local = LocalExecutor(exp.program(), seed=0)
    local_rows = run_experiment(exp, gr.RunOptions(**OPTS), out=io.StringIO(),
                                executor=local).rows
    assert ["eval/pass@2" in r for r in ray_rows] == [False, True]
    assert iterations == [0, 1, 1]   # the step-start reshard each step, the eval one once
    for key in ("eval/pass@1", "eval/pass@2", "eval/reward_mean", "eval/greedy_pass@1",
                "eval/response_length_mean", "reward_mean"):
        assert ray_rows[1][key] == pytest.approx(local_rows[1][key], abs=1e-6), key
