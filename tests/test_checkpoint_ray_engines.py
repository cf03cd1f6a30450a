"""Sharded checkpoints on Ray (4 fake GPUs): PPO with the policy trained by megatron-core
(tp 2 x pp 2) and the critic by DeepSpeed ZeRO-2 (dp 4) writes a checkpoint after 2
iterations, every rank its own shard; the run resumes onto another placement (megatron
dp 2 with ZeRO-1 on GPUs 0-1, DeepSpeed ZeRO-3 dp 2 on GPUs 2-3) and on the local backend
(HF engines), and its metrics match an uninterrupted local run within the local-vs-Ray
tolerances of tests/test_ray_engines.py. A changed or missing shard is refused, naming
the file, before anything starts."""
from __future__ import annotations

import io
import json
import shutil

import pytest

pytest.importorskip("ray")
pytest.importorskip("megatron.core")
pytest.importorskip("deepspeed")

import graphrl as gr  # noqa: E402
from graphrl.runner import run_experiment  # noqa: E402

from test_ray_executor import BATCH, SEED, ppo_experiment  # noqa: E402

SHARDED = {"policy.train": {"gpus": "0-3", "tp": 2, "pp": 2, "engine": "megatron"},
           "critic.train": {"gpus": "0-3", "dp": 4, "zero": 2, "engine": "deepspeed"}}
OTHER = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 1, "engine": "megatron"},
         "policy.generate": {"gpus": "2-3"},
         "critic.train": {"gpus": "2-3", "dp": 2, "zero": 3, "engine": "deepspeed"}}
ITERATIONS = 3


def close(a, b):
    """tests/test_ray_engines.py's tolerances (megatron / DeepSpeed vs the HF engines)."""
    assert a["iteration"] == b["iteration"]
    assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
    for key in ("policy_stats/loss", "critic_stats/loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), key


def test_sharded_ray_checkpoint_resumes_on_other_placements(ray_session, tmp_path):
    exp = ppo_experiment()
    base = dict(seed=SEED, batch_size=BATCH, quiet=True)
    reference = run_experiment(exp, gr.RunOptions(iterations=ITERATIONS, **base),
                               out=io.StringIO())
    placements = {}
    for name, p in (("sharded", SHARDED), ("other", OTHER)):
        placements[name] = tmp_path / f"{name}.json"
        placements[name].write_text(json.dumps(p))
    ray = dict(backend="ray", cluster="1x4xcpu", call_timeout=120.0, **base)
    first = run_experiment(exp, gr.RunOptions(
        iterations=ITERATIONS, placement=str(placements["sharded"]),
        checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, keep=2, **ray),
        out=io.StringIO())
    ckpt = tmp_path / "ckpt" / "ckpt-00000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for model in ("policy", "critic"):   # every rank wrote its shard, checksummed
        for f in [f"rank{r}.pt" for r in range(4)] + ["index.json"]:
            assert f"models/{model}/{f}" in manifest["files"], (model, f)
    index = json.loads((ckpt / "models" / "policy" / "index.json").read_text())
    assert (index["format"], index["tp"], index["pp"]) == ("megatron", 2, 2)
    assert json.loads((ckpt / "models" / "critic" / "index.json").read_text())["zero"] == 2

    out = io.StringIO()
    resumed = run_experiment(exp, gr.RunOptions(
        iterations=ITERATIONS, placement=str(placements["other"]), resume=str(ckpt), **ray),
        out=out)
    assert "resumed from" in out.getvalue()
    local = run_experiment(exp, gr.RunOptions(iterations=ITERATIONS, resume=str(ckpt), **base),
                           out=io.StringIO())
    for rows in (first.rows, resumed.rows, local.rows):
        for a, b in zip(rows, reference.rows):
            close(a, b)
    assert len(resumed.rows) == len(local.rows) == ITERATIONS
    assert resumed.rows[:2] == first.rows[:2]   # the checkpoint's rows, then one more

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    shard = bad / "models" / "critic" / "rank2.pt"
    shard.write_bytes(shard.read_bytes()[:-8] + b"12345678")
    with pytest.raises(gr.UsageError, match="models/critic/rank2.pt fails its checksum"):
        run_experiment(exp, gr.RunOptions(iterations=ITERATIONS, resume=str(bad), **ray),
                       out=io.StringIO())
    (bad / "models" / "policy" / "rank1.pt").unlink()
    with pytest.raises(gr.UsageError, match="models/critic/rank2.pt|models/policy/rank1.pt"):
        run_experiment(exp, gr.RunOptions(iterations=ITERATIONS, resume=str(bad), **base),
                       out=io.StringIO())
