"""Checkpoints (graphrl.checkpoint): exact resume on the local backend, --keep, refusal
of bad checkpoints before anything loads, and SIGKILL during checkpoint writes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import graphrl as gr
from conftest import ROOT
from graphrl.checkpoint import SLOW_ENV, published
from graphrl.runner import run_experiment

ITERATIONS = 4
TINY = f'''
import dataclasses, sys
sys.path.insert(0, {str(ROOT / "examples")!r})
import ppo
from common import task_for, train_reward_model


def build(opts):
    """PPO with a reward model trained briefly (tests)."""
    exp = ppo.build(opts)
    task = task_for(opts)
    return dataclasses.replace(exp, iterations={ITERATIONS}, prepare=lambda engines:
        train_reward_model(engines["reward"], task, opts.seed, pairs=64, epochs=1))
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the subprocesses (equal arithmetic on both sides;
    faster on a loaded 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("example") / "tiny_ppo.py"
    path.write_text(TINY)
    return path


def build(tiny, **kw):
    from graphrl.example_file import load_example

    opts = gr.RunOptions(**{"batch_size": 4, "quiet": True, **kw})
    return load_example(str(tiny))(opts), opts


def run(tiny, **kw):
    exp, opts = build(tiny, **kw)
    return run_experiment(exp, opts, out=open(os.devnull, "w"))


def same(rows):
    """Metrics rows without their wall-clock fields."""
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted run that checkpoints every 2 iterations (keep 3)."""
    folder = tmp_path_factory.mktemp("ref")
    summary = run(tiny, checkpoint_dir=str(folder), checkpoint_every=2, keep=3)
    return summary, folder


def test_resume_equals_uninterrupted_bit_for_bit(tiny, reference, tmp_path):
    summary, folder = reference
    assert [p.name for p in published(folder)] == ["ckpt-00000002", "ckpt-00000004"]
    plain = run(tiny)   # checkpointing itself changes nothing
    assert same(plain.rows) == same(summary.rows)
    metrics = tmp_path / "m.jsonl"
    resumed = run(tiny, resume=str(folder / "ckpt-00000002"), metrics=str(metrics))
    assert same(resumed.rows) == same(summary.rows)
    assert len(same(resumed.rows)) == ITERATIONS
    written = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert same(written) == same(summary.rows)
    assert resumed.prepare == summary.prepare   # prepare() not re-run, its metrics kept


def test_keep_prunes_old_checkpoints(tiny, tmp_path):
    run(tiny, iterations=3, checkpoint_dir=str(tmp_path), checkpoint_every=1, keep=1)
    assert [p.name for p in published(tmp_path)] == ["ckpt-00000003"]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_are_refused_naming_file(tiny, reference, tmp_path):
    _, folder = reference
    ck = copy_checkpoint(folder / "ckpt-00000004", tmp_path / "a" / "ckpt-00000004")
    (ck / "models" / "critic.pt").unlink()
    with pytest.raises(gr.UsageError, match=r"models/critic.pt is missing"):
        run(tiny, resume=str(ck.parent))
    ck = copy_checkpoint(folder / "ckpt-00000004", tmp_path / "b" / "ckpt-00000004")
    data = bytearray((ck / "models" / "policy.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ck / "models" / "policy.pt").write_bytes(bytes(data))
    with pytest.raises(gr.UsageError, match=r"models/policy.pt fails its checksum"):
        run(tiny, resume=str(ck))
    ck = folder / "ckpt-00000002"
    with pytest.raises(gr.UsageError, match=r"another step.*Prompts\[8"):
        run(tiny, resume=str(ck), batch_size=8)
    with pytest.raises(gr.UsageError, match=r"--seed 0, this run has --seed 1"):
        run(tiny, resume=str(ck), seed=1)
    config = tmp_path / "critic.json"
    config.write_text(json.dumps(dict(model_type="gpt2", vocab_size=16, n_embd=32, n_layer=2,
                                      n_head=4, n_inner=128, n_positions=64)))
    with pytest.raises(gr.UsageError, match=r"model critic parameter \S+ has shape \[\d+, 64\] "
                                            r"in the checkpoint, \[\d+, 32\] in this run"):
        run(tiny, resume=str(ck), model_config=(("critic", str(config)),))


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tiny, reference,
                                                                       tmp_path):
    """SIGKILL the run at random moments while it writes a checkpoint every iteration
    (each file write slowed by the test hook); the newest published checkpoint loads and
    the resumed run equals the uninterrupted one; half-written directories go away."""
    summary, _ = reference
    env = dict(os.environ, **{SLOW_ENV: "0.05", "OMP_NUM_THREADS": "1"})
    mid_write, resumed_from, started = 0, [], time.monotonic()
    for seed in range(3):
        rng = random.Random(seed)
        folder = tmp_path / f"run{seed}"
        proc = subprocess.Popen([sys.executable, "-m", "graphrl.cli", "run", str(tiny),
                                 "--batch-size", "4", "--quiet", "--checkpoint-dir",
                                 str(folder), "--checkpoint-every", "1", "--keep", "2"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = rng.randint(2, 3)   # kill while writing this checkpoint, at a random time
        deadline = time.monotonic() + 120
        try:
            while not any(folder.glob(f".tmp-ckpt-{target:08d}-*")):
                assert proc.poll() is None, "the run ended before the kill"
                assert time.monotonic() < deadline, "no checkpoint write began in 120 s"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        partial = list(folder.glob(".tmp-*"))
        mid_write += bool(partial)
        last = published(folder)[-1]
        resumed_from.append(last.name)
        resumed = run(tiny, resume=str(folder), checkpoint_dir=str(folder))
        assert same(resumed.rows) == same(summary.rows), (seed, last)
        assert not list(folder.glob(".tmp-*"))
    print(f"kills: 3, mid-write: {mid_write}, resumed from: {resumed_from}, "
          f"{time.monotonic() - started:.1f} s")
    assert mid_write >= 2


def test_checkpoint_options_are_checked(tiny, tmp_path):
    with pytest.raises(gr.UsageError, match="--checkpoint-every needs --checkpoint-dir"):
        run(tiny, checkpoint_every=2)
    with pytest.raises(gr.UsageError, match="--max-restarts needs --checkpoint-dir"):
        run(tiny, max_restarts=1)
    with pytest.raises(gr.UsageError, match="no published checkpoint"):
        run(tiny, resume=str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(gr.UsageError, match="--checkpoint-dir .*not a directory"):
        run(tiny, checkpoint_dir=str(tmp_path / "file"))


def test_cli_takes_the_options_and_reports_bad_resume(tiny, tmp_path, capsys):
    from graphrl.cli import main

    rc = main(["run", str(tiny), "--quiet", "--resume", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and "graphrl: error: --resume" in err and "no such directory" in err
    rc = main(["run", str(tiny), "--quiet", "--max-restarts", "-1"])
    assert rc == 2 and "--max-restarts" in capsys.readouterr().err


def test_async_run_resumes_with_its_queued_rollouts(tiny, tmp_path):
    """--staleness 1: the checkpoint holds the rollout generated but not yet trained on
    (carried.pt); the resumed run equals the uninterrupted one bit for bit."""
    full = run(tiny, staleness=1, checkpoint_dir=str(tmp_path), checkpoint_every=2, keep=3)
    ckpt = tmp_path / "ckpt-00000002"
    assert (ckpt / "carried.pt").is_file()
    assert json.loads((ckpt / "run.json").read_text())["data"]["next_iteration"] == 3
    resumed = run(tiny, staleness=1, resume=str(ckpt))
    assert len(resumed.rows) == ITERATIONS
    assert same(resumed.rows) == same(full.rows)
    with pytest.raises(gr.UsageError, match="another step"):   # staleness is in the graph
        run(tiny, resume=str(ckpt))
