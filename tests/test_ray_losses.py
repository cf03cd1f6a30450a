"""A user's loss from its own file (tests/data/user_loss.py) on the Ray executor: the
LossDef travels to the actors pickled by value (its file is no importable module there)
and gives the local backend's answers, with policy.train data-parallel over two ranks
(each rank's share weighted by the loss's measure: rows, for this per-sequence mean)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("torch")

import graphrl as gr  # noqa: E402
from test_user_loss import policy_only  # noqa: E402
from graphrl.backends.local import LocalExecutor  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.runner import run_experiment  # noqa: E402

USER = str(Path(__file__).parent / "data" / "user_loss.py")
PLACEMENT = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3}}


def test_user_loss_on_ray_equals_local(ray_session):
    from graphrl.backends.ray.executor import RayExecutor

    opts = gr.RunOptions(iterations=2, quiet=True)
    exp = policy_only(gr.load_loss(f"{USER}:seq_mean_pg"))
    plan = compile_graph(exp.program().graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=PLACEMENT).plan
    train = next(n for n in plan.graph.nodes if n.target == "train")
    assert train.placement.strategy.dp == 2
    local = run_experiment(exp, opts, out=io.StringIO(),
                           executor=LocalExecutor(exp.program(), seed=0))
    ex = RayExecutor(exp.program(), plan, seed=0, timeout_s=120.0,
                     env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        remote = run_experiment(exp, opts, out=io.StringIO(), executor=ex)
    finally:
        ex.close()
    for r, l in zip(remote.rows, local.rows, strict=True):
        assert r["reward_mean"] == l["reward_mean"]
        for key in ("policy_stats/loss", "policy_stats/ratio_mean"):
            assert r[key] == pytest.approx(l[key], rel=1e-5, abs=1e-6), key
