"""`graphrl run --backend ray` end to end in a subprocess: it compiles for the cluster,
starts its own Ray, runs the RL loop, and on Ctrl-C (SIGINT) shuts Ray down — exit 130,
one line, and Ray's session folder gone."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

# the PPO example without its minute of reward-model pre-training
TINY = """import dataclasses, sys
sys.path.insert(0, {examples!r})
from ppo import build as ppo_build


def build(opts):
    return dataclasses.replace(ppo_build(opts), prepare=None)
"""

# `graphrl` as a terminal starts it: SIGINT at its default and not blocked. A child
# inherits its parent's ignored and blocked signals, and Python installs its Ctrl-C
# handler only where SIGINT is at its default, so whatever an earlier test in this
# pytest process left in its signal state must not reach the run under test.
AS_FROM_A_TERMINAL = ("import runpy, signal, sys; "
                      "signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                      "sys.argv[0] = 'graphrl'; "
                      "runpy.run_module('graphrl.cli', run_name='__main__')")


def signal_masks(pid: int) -> str:
    """The process's blocked, ignored and caught signal masks (for a failure's message)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as e:
        return f"(no /proc status: {e})"
    return " ".join(l.replace("\t", "") for l in lines if l.startswith(("SigBlk", "SigIgn",
                                                                         "SigCgt")))


def test_ray_run_and_ctrl_c(root, tmp_path, request, own_ray):
    """`graphrl run --backend ray` in a subprocess, interrupted: it exits 130, tidy. The
    session's shared Ray cluster is stopped first (`own_ray`): beside it on two cores the
    subprocess's own cluster took over a minute to shut down."""
    example = tmp_path / "tiny_ppo.py"
    example.write_text(TINY.format(examples=str(root / "examples")))
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"policy.train": {"gpus": "0"},
                                     "policy.generate": {"gpus": "1"}}))
    metrics, home = tmp_path / "m.jsonl", tmp_path / "home"
    home.mkdir()
    # a short TMPDIR: Ray puts unix sockets under it (paths of at most 107 bytes)
    tmp = Path(tempfile.mkdtemp(prefix="grtest-"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    env = dict(os.environ, TMPDIR=str(tmp), HOME=str(home))
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_FROM_A_TERMINAL, "run", str(example), "--backend", "ray",
         "--cluster", "1x2xcpu", "--placement", str(placement), "--iterations", "1000",
         "--batch-size", "4", "--quiet", "--metrics", str(metrics),
         "--trace", str(tmp_path / "trace.json")],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert len(metrics.read_text().splitlines()) >= 2, "no iterations within 150 s"
        assert [p.name for p in tmp.iterdir() if p.name.startswith("graphrl-ray-")]
        masks = (f"run: {signal_masks(proc.pid)}; pytest: {signal_masks(os.getpid())}, "
                 f"SIGINT handler {signal.getsignal(signal.SIGINT)}")
        # Ctrl-C, pressed again every 20 s while the run goes on: on the loaded CI machine,
        # after the other Ray tests, a single SIGINT was at times not acted on (the run
        # went on to its end); a hang or a run that never stops is the defect
        deadline = time.monotonic() + 150
        while True:
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=20)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise AssertionError(f"Ctrl-C not acted on in 150 s ({masks})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, f"{masks}\n{err[-3000:]}"
    assert "graphrl: interrupted" in err and "Traceback" not in err, err[-3000:]
    row = json.loads(metrics.read_text().splitlines()[0])
    assert row["seconds/reshard[policy]"] > 0 and 0.0 <= row["reward_mean"] <= 1.0
    assert not [p for p in tmp.iterdir() if p.name.startswith("graphrl-ray-")]
    trace = json.loads((tmp_path / "trace.json").read_text())   # written on Ctrl-C too
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "policy.generate" in names and "policy.train" in names, sorted(names)[:20]
    assert list(home.iterdir()) == []   # no Ray token file under $HOME
