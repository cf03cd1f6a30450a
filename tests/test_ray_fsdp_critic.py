"""A value head trained with FSDP2 on Ray: PPO's critic on zero=3, dp=2 (fake GPUs 0-1)
learns as the local one-process run does. The scalar-head path runs the HF body and the
head Linear, not the root module's forward; FSDP2 all-gathers the root's own weights
(embeddings, final norm, head) in the root's pre-forward hook, so that path must be
registered as a forward method of the root (sharded.FSDPEngine) or it computes on the
sharded DTensors ("aten.embedding got mixed torch.Tensor and DTensor").

Tolerances: those of tests/test_ray_executor.py (FSDP2's reduce-scatter averages two
half-minibatch gradients where one process backpropagates the whole minibatch mean)."""
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

from test_ray_executor import BATCH, SEED, TIMEOUT, ppo_experiment  # noqa: E402

# critic.forward shares the critic's engine: the compiler plans it on the same mesh and
# degrees (graphrl.engines.shared_strategy)
PLACEMENT = {"critic.train": {"gpus": "0-1", "dp": 2, "zero": 3}}
ITERATIONS = 2


def both_runs(exp, iterations):
    """(Ray rows, local rows, the Ray ranks' critic weights, the local critic's)."""
    from graphrl.backends.ray.executor import RayExecutor

    plan = compile_graph(exp.program().graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=PLACEMENT).plan
    opts = gr.RunOptions(iterations=iterations, seed=SEED, batch_size=BATCH, quiet=True)
    ex = RayExecutor(exp.program(), plan, seed=SEED, timeout_s=TIMEOUT,
                     env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        assert (ex.engines.specs["critic"].kind, ex.engines.specs["critic"].gpus) == \
            ("fsdp", (0, 1))
        ray_rows = run_experiment(exp, opts, out=io.StringIO(), executor=ex).rows
        got = ex.weights("critic")
    finally:
        ex.close()
    local = LocalExecutor(exp.program(), seed=SEED)
    local_rows = run_experiment(exp, opts, out=io.StringIO(), executor=local).rows
    assert len(ray_rows) == len(local_rows) == iterations
    return ray_rows, local_rows, got, local.engines["critic"].export_weights()


def test_fsdp2_critic_learns_like_local(ray_session):
    ray_rows, local_rows, got, want = both_runs(ppo_experiment(), ITERATIONS)
    for r, l in zip(ray_rows, local_rows, strict=True):
        assert r["reward_mean"] == l["reward_mean"]              # identical samples
        assert r["rm_score/score_mean"] == pytest.approx(l["rm_score/score_mean"], rel=1e-6)
        for key in ("policy_stats/loss", "policy_stats/approx_kl", "critic_stats/loss"):
            assert r[key] == pytest.approx(l[key], rel=1e-5, abs=1e-6), key
    for rank, w in got.items():
        assert list(w) == list(want)
        diff = sum(float((w[k] - want[k]).norm()) ** 2 for k in want) ** 0.5
        norm = sum(float(want[k].norm()) ** 2 for k in want) ** 0.5
        worst = max(float((w[k] - want[k]).abs().max()) for k in want)
        assert diff / norm < 1e-5 and worst < 1e-4, (rank, diff / norm, worst)


def test_fsdp2_critic_in_bf16(ray_session):
    """bf16: FSDP2 gathers bf16 copies (MixedPrecisionPolicy) of some weights while
    others are still fp32 shards, so the compute context is chosen before the root's
    hook runs (HFEngine._head). One iteration; the critic's scalar head computes in bf16
    here (its weight gathered as bf16), in fp32 in one process: loss within 2% (measured
    0.8%)."""
    exp = dataclasses.replace(load_build("ppo")(gr.RunOptions(
        batch_size=BATCH, seed=SEED, precision="bf16")), prepare=None)
    (r,), (l,), got, want = both_runs(exp, 1)
    assert r["reward_mean"] == l["reward_mean"]
    assert r["critic_stats/loss"] == pytest.approx(l["critic_stats/loss"], rel=2e-2)
    assert all(torch.isfinite(t).all() for w in got.values() for t in w.values())


def test_fsdp2_calls_that_bypass_the_root_module(root):
    """Without Ray (one gloo rank in a subprocess, tests/fsdp_one_rank.py): FSDP2 engines
    whose calls do not run the root module's forward. Value and score heads give the
    plain engine's outputs bit for bit (fp32); the fast engine's fused kernels read the
    parameters directly (shards here), so on FSDP2 it scores through HF's forward, within
    fp32 rounding of its fused path, and its generate (a decode copy of full weights) is
    refused with a message naming the model."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(root / "tests" / "fsdp_one_rank.py")],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["hf/value"]["diff"] == 0.0 and out["hf/score"]["diff"] == 0.0
    fast = out["fast/lm"]
    assert fast["plain_fused"] and not fast["fused"] and fast["diff"] < 1e-5
    assert fast["generate"].startswith("model m: engine fast cannot generate on FSDP2")
