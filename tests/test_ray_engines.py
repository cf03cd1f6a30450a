"""The executed strategy is the planned one: PPO on Ray (1x4xcpu) with the policy trained
by megatron-core (tp 2 x pp 2, 1F1B) and the critic by DeepSpeed (ZeRO-2, dp 4) on the
same four ranks learns like the local one-process run; the policy's reshard from the
megatron layout to the generation replicas is exact and moves the planned bytes; the
report states each call's engine and degrees."""
from __future__ import annotations

import io

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("deepspeed")

import graphrl as gr  # noqa: E402
from graphrl.backends.local import LocalExecutor  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.runner import run_experiment  # noqa: E402

from test_ray_executor import BATCH, ITERATIONS, SEED, ppo_experiment  # noqa: E402

PLACEMENT = {"policy.train": {"gpus": "0-3", "tp": 2, "pp": 2, "engine": "megatron"},
             "critic.train": {"gpus": "0-3", "dp": 4, "zero": 2, "engine": "deepspeed"}}
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def exp():
    return ppo_experiment()


@pytest.fixture(scope="module")
def ray_run(ray_session, exp):
    from graphrl.backends.ray.executor import RayExecutor

    plan = compile_graph(exp.program().graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=PLACEMENT, engines=True).plan
    ex = RayExecutor(exp.program(), plan, seed=SEED, timeout_s=TIMEOUT, check_reshards=True,
                     env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        out = io.StringIO()
        opts = gr.RunOptions(iterations=ITERATIONS, seed=SEED, batch_size=BATCH, quiet=True)
        summary = run_experiment(exp, opts, out=out, executor=ex)
        yield summary, out.getvalue(), ex.call_engines(), list(ex.reshards)
    finally:
        ex.close()


def test_megatron_and_deepspeed_learn_like_local(ray_run, exp):
    summary, out, engines, reshards = ray_run
    local = LocalExecutor(exp.program(), seed=SEED)
    opts = gr.RunOptions(iterations=ITERATIONS, seed=SEED, batch_size=BATCH, quiet=True)
    local_summary = run_experiment(exp, opts, out=io.StringIO(), executor=local)
    for r, l in zip(summary.rows, local_summary.rows, strict=True):
        # same samples while the weights agree to float error (they do over 3 steps)
        assert r["reward_mean"] == pytest.approx(l["reward_mean"], abs=1e-6)
        for key in ("policy_stats/loss", "critic_stats/loss"):
            assert r[key] == pytest.approx(l[key], rel=1e-3, abs=1e-5), key
    # the engines and degrees that ran, as planned
    train = engines["policy.train"]
    assert (train["engine"], train["dp"], train["tp"], train["pp"], train["sp"]) == \
        ("megatron", 1, 2, 2, True)
    assert engines["policy.forward"]["engine"] == "megatron"
    critic = engines["critic.train"]
    assert (critic["engine"], critic["dp"], critic["zero"]) == ("deepspeed", 4, 2)
    assert engines["policy.generate"]["engine"] == "hf"
    assert "engine and degrees per call" in out and "engine=megatron" in out
    # the reshard from megatron's TP x PP layout to the generation replicas
    assert reshards and all(r.exact is True for r in reshards)
    assert all(r.measured == r.transfer_plan for r in reshards)
