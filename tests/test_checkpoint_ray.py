"""Checkpoints on Ray (one Ray run, 4 fake GPUs): a run resumes on Ray from a checkpoint
written by the local backend (another placement: the plan is compiled for the cluster,
FSDP2 takes its shards of the full state), a rank killed inside policy.train is
restarted from the last checkpoint (--max-restarts 1), and the Ray checkpoints resume
on the local backend (the last one, of the finished run, extended by an iteration). Metrics agree with an uninterrupted local run within the
tolerances of tests/test_ray_executor.py (training is not bit-identical across
placements: gradient sums are taken in another order)."""
from __future__ import annotations

import dataclasses
import io
import json

import pytest

pytest.importorskip("ray")

import graphrl as gr  # noqa: E402
from conftest import load_build  # noqa: E402
from graphrl.backends.ray.runtime import KILL_ENV  # noqa: E402
from graphrl.checkpoint import published  # noqa: E402
from graphrl.runner import run_experiment  # noqa: E402

PLACEMENT = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3},
             "policy.generate": {"gpus": "2-3"},
             "critic.train": {"gpus": "2-3", "dp": 2, "zero": 0}}
ITERATIONS, BATCH, SEED = 3, 8, 0


def experiment():
    # fp32: Ray and local runs are compared exactly (tests/test_ray_executor.py)
    exp = load_build("ppo")(gr.RunOptions(batch_size=BATCH, seed=SEED, precision="fp32"))
    return dataclasses.replace(exp, prepare=None, iterations=ITERATIONS)


def close(a, b):
    """The local-vs-Ray tolerances of tests/test_ray_executor.py."""
    assert a["reward_mean"] == b["reward_mean"]
    assert a["rm_score/score_mean"] == pytest.approx(b["rm_score/score_mean"], rel=1e-6)
    for key in ("policy_stats/loss", "policy_stats/approx_kl", "critic_stats/loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_ray_resume_restart_and_placement_change(ray_session, tmp_path, monkeypatch):
    exp = experiment()
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    base = dict(iterations=ITERATIONS, seed=SEED, batch_size=BATCH, quiet=True)
    longer = dict(base, iterations=ITERATIONS + 1)   # for extending the Ray run below
    reference = run_experiment(exp, gr.RunOptions(**longer, checkpoint_dir=str(local_dir),
                                                  checkpoint_every=1, keep=ITERATIONS + 1),
                               out=io.StringIO())
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps(PLACEMENT))
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, f"1:2:policy.train:{marker}")
    out = io.StringIO()
    ray_opts = gr.RunOptions(**base, backend="ray", cluster="1x4xcpu",
                             placement=str(placement), call_timeout=60.0,
                             resume=str(local_dir / "ckpt-00000001"),
                             checkpoint_dir=str(ray_dir), checkpoint_every=1, keep=3,
                             max_restarts=1)
    ray_run = run_experiment(exp, ray_opts, out=out)
    log = out.getvalue()
    assert marker.exists()   # the rank really died
    assert "resumed from" in log and "ckpt-00000001" in log
    assert ("worker lost at iteration 2 (rank(s) 1 died" in log
            and "restart 1/1 from" in log and "(0 iteration(s) lost)" in log), log
    assert [r["iteration"] for r in ray_run.rows] == list(range(ITERATIONS))
    for a, b in zip(ray_run.rows, reference.rows[:ITERATIONS], strict=True):
        close(a, b)
    ray_ckpt = published(ray_dir)[-2]   # after 2 iterations, written on Ray (FSDP2)
    assert json.loads((ray_ckpt / "manifest.json").read_text())["placement"]["backend"] == "ray"
    back = run_experiment(exp, gr.RunOptions(**base, resume=str(ray_ckpt)), out=io.StringIO())
    for a, b in zip(back.rows, reference.rows[:ITERATIONS], strict=True):
        close(a, b)
    # the finished Ray run's last checkpoint extends by one iteration (here on the local
    # backend): the longer uninterrupted run's rows, within the same tolerances
    extended = run_experiment(exp, gr.RunOptions(**longer, resume=str(published(ray_dir)[-1])),
                              out=io.StringIO())
    for a, b in zip(extended.rows, reference.rows, strict=True):
        close(a, b)


def test_ray_run_gives_up_after_max_restarts(ray_session, tmp_path, monkeypatch):
    """A rank that dies again after its restart: with --max-restarts 1 the run restarts
    once, then ends with the lost-worker error naming the rank."""
    from graphrl.errors import ExecutionError

    exp = experiment()
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps(PLACEMENT))
    marker = tmp_path / "kills"
    monkeypatch.setenv(KILL_ENV, f"1:1:policy.train:{marker}:2")
    out = io.StringIO()
    opts = gr.RunOptions(iterations=2, seed=SEED, batch_size=BATCH, quiet=True,
                         backend="ray", cluster="1x4xcpu", placement=str(placement),
                         call_timeout=60.0, checkpoint_dir=str(tmp_path / "ckpt"),
                         checkpoint_every=1, max_restarts=1)
    with pytest.raises(ExecutionError) as info:
        run_experiment(exp, opts, out=out)
    log = out.getvalue()
    assert marker.read_text() == "2"   # died twice: once before, once after the restart
    assert "restart 1/1 from" in log and "restart 2/" not in log, log
    assert "rank(s) 1 died at iteration 1; gave up after 1 restart(s)" in str(info.value), \
        str(info.value)


def test_ray_async_checkpoint_holds_and_resumes_the_queued_rollouts(ray_session, tmp_path):
    """--staleness 1 on Ray: a local async checkpoint (its queued rollout in carried.pt)
    resumes on Ray, whose metrics match the uninterrupted local run; the Ray run's own
    checkpoint at the end holds the rollout it queued, the one the local run queued."""
    import torch

    from graphrl.checkpoint import load_torch

    exp = experiment()
    base = dict(iterations=ITERATIONS, seed=SEED, batch_size=BATCH, quiet=True, staleness=1)
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    reference = run_experiment(exp, gr.RunOptions(**base, checkpoint_dir=str(local_dir),
                                                  checkpoint_every=2, keep=2),
                               out=io.StringIO())
    assert (local_dir / "ckpt-00000002" / "carried.pt").is_file()
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps(PLACEMENT))
    out = io.StringIO()
    resumed = run_experiment(exp, gr.RunOptions(
        **base, backend="ray", cluster="1x4xcpu", placement=str(placement),
        call_timeout=60.0, resume=str(local_dir / "ckpt-00000002"),
        checkpoint_dir=str(ray_dir)), out=out)
    assert "resumed from" in out.getvalue()
    assert [r["iteration"] for r in resumed.rows] == [r["iteration"] for r in reference.rows]
    for a, b in zip(resumed.rows, reference.rows, strict=True):
        close(a, b)
    theirs = load_torch(published(ray_dir)[-1] / "carried.pt")
    ours = load_torch(local_dir / "ckpt-00000003" / "carried.pt")
    assert sorted(theirs) == sorted(ours) and ours
    for name, payload in ours.items():
        assert sorted(theirs[name]) == sorted(payload), name
        for field, t in payload.items():
            if t.is_floating_point():
                assert torch.allclose(theirs[name][field], t, rtol=1e-4, atol=1e-5), field
            else:
                assert torch.equal(theirs[name][field], t), (name, field)
