"""Adaptive KL control with policy.train data-parallel over two Ray ranks (hf replicas,
and FSDP): every rank sums the call's kl stat over the ranks before the Ziegler update
(without that sum the engine refuses a sharded adaptive train), so each reported
coefficient is the Ziegler update of the last from the reported, rank-averaged KL."""
from __future__ import annotations

import io

import pytest

pytest.importorskip("ray")
pytest.importorskip("torch")

import graphrl as gr  # noqa: E402
from test_adaptive_kl import KL, experiment, stat, ziegler  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.runner import run_experiment  # noqa: E402


@pytest.mark.parametrize("zero", [0, 3])
def test_adaptive_coefficient_on_two_ranks_follows_the_mean_kl(ray_session, zero):
    from graphrl.backends.ray.executor import RayExecutor

    opts = gr.RunOptions(batch_size=2, quiet=True, seed=0)
    exp = experiment(opts, **KL)
    plan = compile_graph(exp.program().graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement={"policy.train": {"gpus": "0-1", "dp": 2,
                                                     "zero": zero}}).plan
    train = next(n for n in plan.graph.nodes if n.target == "train")
    assert train.placement.strategy.dp == 2
    ex = RayExecutor(exp.program(), plan, seed=0, timeout_s=120.0,
                     env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        remote = run_experiment(exp, opts, out=io.StringIO(), executor=ex)
    finally:
        ex.close()
    # every rank updates from the KL averaged over the ranks (the reported one): each
    # row's coefficient is the Ziegler update of the last row's (stats are float32)
    coefs = [stat(r, "/kl_coef") for r in remote.rows]
    kls = [stat(r, "/kl") for r in remote.rows]
    assert coefs[0] == pytest.approx(KL["kl_coef"], rel=1e-7) and len(set(coefs)) == 3
    for t in range(2):
        want = ziegler(coefs[t], kls[t], KL["kl_target"], KL["kl_gain"])
        assert coefs[t + 1] == pytest.approx(want, rel=1e-6, abs=0)
