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
    with pytest.raises(gr.UsageError, match=r"settings differ.*--batch-size: checkpoint 4, "
                                            r"this run 8"):
        run(tiny, resume=str(ck), batch_size=8)
    with pytest.raises(gr.UsageError, match=r"--seed: checkpoint 0, this run 1"):
        run(tiny, resume=str(ck), seed=1)
    config = tmp_path / "critic.json"
    config.write_text(json.dumps(dict(model_type="gpt2", vocab_size=16, n_embd=32, n_layer=2,
                                      n_head=4, n_inner=128, n_positions=64)))
    with pytest.raises(gr.UsageError, match=r"model critic: checkpoint gpt2\{\S+ hidden=64.*"
                                            r"this run gpt2\{\S+ hidden=32.*--model-config: "
                                            r"checkpoint not given, this run critic="):
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
    with pytest.raises(gr.UsageError, match="--staleness: checkpoint 1, this run 0"):
        run(tiny, resume=str(ckpt))
    # a finished async run (its queue saved at the end) extends like the uninterrupted one
    short = tmp_path / "short"
    run(tiny, staleness=1, iterations=2, checkpoint_dir=str(short))
    extended = run(tiny, staleness=1, resume=str(short))
    assert same(extended.rows) == same(full.rows)


# -- extending a finished run, and what a resume refuses -------------------------------------
def weights(ckpt: Path) -> dict[str, dict]:
    """Every model's state (weights, AdamW moments, version) in a checkpoint."""
    from graphrl.checkpoint import load_torch

    return {p.stem: load_torch(p) for p in sorted((ckpt / "models").glob("*.pt"))}


def assert_equal_state(a, b, where=""):
    import torch

    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            assert_equal_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_state(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_finished_run_extends_bit_for_bit(tiny, reference, tmp_path):
    """A 2-iteration run, finished, then resumed with --iterations 4: every metrics row and
    the final weights and optimizer state equal the uninterrupted 4-iteration run's."""
    import io

    import torch

    summary, folder = reference
    ck, saved = tmp_path / "ck", tmp_path / "saved"
    run(tiny, iterations=2, checkpoint_dir=str(ck))
    out = io.StringIO()
    exp, opts = build(tiny, resume=str(ck), checkpoint_dir=str(ck), save=str(saved))
    extended = run_experiment(exp, opts, out=out)
    assert "resumed from" in out.getvalue() and "after 2 iterations" in out.getvalue()
    assert "[ppo_step] 4 iterations (2 from the checkpoint, 2 run in " in out.getvalue()
    assert same(extended.rows) == same(summary.rows) and len(extended.rows) == ITERATIONS
    final = weights(folder / "ckpt-00000004")
    assert_equal_state(weights(ck / "ckpt-00000004"), final)
    # --save of the extended run: the policy a Hugging Face directory of the final weights
    import transformers

    policy = transformers.AutoModelForCausalLM.from_pretrained(saved).state_dict()
    for name, t in final["policy"]["weights"].items():
        assert torch.equal(policy[name], t.to(policy[name].dtype)), name
    for asked in (ITERATIONS, 3):   # nothing left to run: one line, no run, no summary
        out = io.StringIO()
        exp, opts = build(tiny, resume=str(ck), iterations=asked)
        done = run_experiment(exp, opts, out=out)
        assert out.getvalue() == (f"[ppo_step] nothing to run: checkpoint "
                                  f"{ck / 'ckpt-00000004'} already has 4 iterations and this "
                                  f"run asks for {asked} (--iterations); give more to extend "
                                  "it\n")
        assert same(done.rows) == same(summary.rows)
    with pytest.raises(gr.UsageError, match=r"--save .*nothing to run"):
        run(tiny, resume=str(ck), save=str(tmp_path / "out"))


def test_resume_refuses_changed_settings_naming_the_flag(tiny, reference, tmp_path):
    """Settings are compared flag by flag before anything starts; spelling out the
    example's own default is no change."""
    from graphrl import checkpoint_run as ckr
    from graphrl.checkpoint import find_checkpoint
    from graphrl.run_identity import differences, run_settings

    ck = str(reference[1] / "ckpt-00000004")

    def open_resume(**kw):
        exp, opts = build(tiny, resume=ck, iterations=6, **kw)
        return ckr.open_resume(opts, exp, exp.program(opts.staleness))

    assert open_resume(prompt_len=6).iteration == 4   # the task's own prompt length
    with pytest.raises(gr.UsageError, match=r"--prompt-len: checkpoint not given, this run 7"):
        open_resume(prompt_len=7)
    with pytest.raises(gr.UsageError, match=r"--precision: checkpoint critic=bf16,\S+ this run "
                                            r"critic=fp32"):
        open_resume(precision="fp32")
    with pytest.raises(gr.UsageError, match=r"--seed: checkpoint 0, this run 2; "
                                            r"--batch-size: checkpoint 4, this run 5"):
        open_resume(seed=2, batch_size=5)
    # the last checkpoint of a finished run written before the next inputs were recorded
    exp, opts = build(tiny, resume=ck, iterations=6)
    old = {"data": {"next_iteration": 4, "next_inputs": None}}
    with pytest.raises(gr.UsageError, match=r"records no fingerprint of the next inputs, so "
                                            r"it cannot be extended"):
        ckr.check_next_inputs(find_checkpoint(ck), exp, opts, old, [])
    # --data by its contents: the same file elsewhere is no change, changed rows are
    exp, opts = build(tiny)
    program = exp.program()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a"}\n')
    before = run_settings(gr.RunOptions(data=str(rows)), program)
    moved = tmp_path / "moved.jsonl"
    rows.rename(moved)
    assert differences(before, run_settings(gr.RunOptions(data=str(moved)), program),
                       ("--data",)) == []
    moved.write_text('{"prompt": "b"}\n')
    [line] = differences(before, run_settings(gr.RunOptions(data=str(moved)), program),
                         ("--data",))
    assert line.startswith(f"--data: checkpoint {rows} (sha256 ") and str(moved) in line


def test_corruption_is_reported_before_changed_settings(tiny, reference, tmp_path):
    """A corrupt checkpoint resumed with other flags is refused as corrupt (its checksums
    first), wherever the corruption is: a model file, run.json or the manifest itself."""
    _, folder = reference
    for name, flip in (("models/policy.pt", None), ("run.json", ('"--seed": 0', '"--seed": 1')),
                       ("manifest.json", ('"seed": 0', '"seed": 1'))):
        ck = copy_checkpoint(folder / "ckpt-00000004", tmp_path / name.replace("/", "_"))
        f = ck / name
        if flip is None:
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        else:
            assert flip[0] in f.read_text()
            f.write_text(f.read_text().replace(*flip))
        with pytest.raises(gr.UsageError, match=r"fails its (own )?checksum") as e:
            run(tiny, resume=str(ck), seed=1, iterations=6)
        assert name.split("/")[-1] in str(e.value)


def test_cli_resume_exit_codes(tiny, reference, capsys):
    """Nothing to run is no error (exit 0); changed settings are one line (exit 2)."""
    from graphrl.cli import main

    ck = str(reference[1])
    assert main(["run", str(tiny), "--batch-size", "4", "--quiet", "--resume", ck]) == 0
    rc = main(["run", str(tiny), "--batch-size", "4", "--quiet", "--resume", ck, "--seed", "3",
               "--iterations", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--seed: checkpoint 0, this run 3" in err and "Traceback" not in err
