"""One test per silent case, hang and traceback of issue 12 (in-process main() calls)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from graphrl.cli import main
from graphrl.errors import TraceError

ROOT = Path(__file__).resolve().parents[1]
PPO = str(ROOT / "examples" / "ppo.py")
CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 32, "intermediate_size": 64}


def error_of(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, (rc, err)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("graphrl: error:")]
    return line


def test_role_typos_are_errors_with_a_suggestion(capsys):
    line = error_of(capsys, ["compile", PPO, "--cluster", "1x8xH100", "--model-size",
                             "polciy=70b"])
    assert "no model 'polciy'" in line and "did you mean 'policy'" in line
    line = error_of(capsys, ["compile", PPO, "--cluster", "1x8xH100", "--model-config",
                             "foo=/nonexistent.json"])
    assert "no model 'foo'" in line


def test_placement_numbers_are_not_truncated(tmp_path, capsys):
    for value, shown in (("2.7", "got 2.7"), ("true", "got the boolean true"),
                         ("-1", "must be >= 1")):
        path = tmp_path / "p.yaml"
        path.write_text(f"policy.train: {{dp: {value}}}\n")
        line = error_of(capsys, ["compile", PPO, "--cluster", "1x8xH100", "--placement",
                                 str(path)])
        assert "policy.train: dp" in line and shown in line


def test_placement_errors_do_not_echo_file_contents(tmp_path, capsys):
    secret = "hunter2-secret-token-value"
    path = tmp_path / "not-a-placement"
    path.write_text(f"{secret}: {{{secret}: {secret}}}\n")
    assert secret not in error_of(capsys, ["compile", PPO, "--cluster", "1x8xH100",
                                           "--placement", str(path)])
    path.write_text(f"policy.train: {{tp: {secret}}}\n")
    assert secret not in error_of(capsys, ["compile", PPO, "--cluster", "1x8xH100",
                                           "--placement", str(path)])


@pytest.mark.parametrize("config, needle", [
    ({**CONFIG, "hidden_size": -64}, "hidden_size must be >= 1, got -64"),
    ({**CONFIG, "hidden_size": 100}, "not divisible by the 32 attention heads"),
    ({**CONFIG, "num_hidden_layers": 2.5}, "num_hidden_layers must be an integer, got 2.5"),
    ({}, "lacks vocab_size"),
    ([], "expected a JSON object"),
    ({**CONFIG, "model_type": "lama"}, "did you mean 'llama'"),
])
def test_model_configs_are_checked_field_by_field(tmp_path, capsys, config, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    for argv in (["compile", PPO, "--cluster", "1x8xH100", "--model-config", f"policy={path}"],
                 ["estimate", "--model-config", str(path), "--phase", "train", "--batch",
                  "1", "--seq", "8"]):
        assert needle in error_of(capsys, argv)


def test_estimate_tp_must_divide_the_heads(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    line = error_of(capsys, ["estimate", "--model-config", str(path), "--phase", "train",
                             "--batch", "1", "--seq", "8", "--tp", "3"])
    assert "--tp 3 does not divide the model's 32 attention heads" in line


def test_huge_cluster_is_refused_at_once(capsys):
    start = time.monotonic()
    line = error_of(capsys, ["compile", PPO, "--cluster", "100000x8xH100"])
    assert "beyond the 1024" in line and time.monotonic() - start < 10


def test_dead_ray_address_fails_fast(capsys, own_ray):
    start = time.monotonic()
    line = error_of(capsys, ["run", PPO, "--backend", "ray", "--address", "127.0.0.1:1",
                             "--iterations", "1", "--quiet"])
    assert "--address 127.0.0.1:1: cannot connect" in line
    assert time.monotonic() - start < 30


def test_wait_deadline_follows_the_plan():
    from types import SimpleNamespace as NS

    from graphrl.launch import WAIT_FLOOR_S, wait_deadline

    plan = NS(streams=[NS(instrs=[NS(seconds=100.0), NS(seconds=3.0)])])
    assert wait_deadline(plan) == 1000.0            # a 100 s call is not cut at 120 s
    assert wait_deadline(NS(streams=[NS(instrs=[NS(seconds=0.1)])])) == WAIT_FLOOR_S
    assert wait_deadline(plan, 42.0) == 42.0


@pytest.mark.parametrize("flag", ["--metrics", "--trace"])
def test_output_paths_are_checked_before_the_run(tmp_path, capsys, flag):
    assert "directory /nonexistent-dir does not exist" in error_of(
        capsys, ["run", PPO, flag, "/nonexistent-dir/x.json", "--iterations", "1"])
    assert "is a directory" in error_of(capsys, ["run", PPO, flag, str(tmp_path)])


def test_dump_path_is_checked_before_compiling(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "exists and is not a directory" in error_of(
        capsys, ["compile", PPO, "--cluster", "1x8xH100", "--dump", str(f)])
    assert "--dump /proc/graphrl" in error_of(
        capsys, ["compile", PPO, "--cluster", "1x8xH100", "--dump", "/proc/graphrl"])


def test_metrics_never_overwrites_an_earlier_run(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 0}\n')
    assert "--overwrite" in error_of(capsys, ["run", PPO, "--metrics", str(path)])
    assert path.read_text() == '{"iteration": 0}\n'


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    import os

    from graphrl.outputs import atomic_write_text

    path = tmp_path / "trace.json"
    atomic_write_text(path, '{"ok": 1}')

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_write_text(path, '{"new": ' + "1" * 1000)
    assert path.read_text() == '{"ok": 1}' and len(list(tmp_path.iterdir())) == 1


def test_trace_and_partial_summary_written_when_a_run_fails(tmp_path):
    """A run interrupted at iteration 2 still writes its trace and reports the completed
    iterations (local backend, tiny model)."""
    import io

    from graphrl.experiment import RunOptions
    from graphrl.runner import run_experiment
    from graphrl.timeline import read_chrome_trace

    opts = RunOptions(iterations=4, batch_size=4, quiet=True, trace=str(tmp_path / "t.json"),
                      metrics=str(tmp_path / "m.jsonl"))
    from graphrl.example_file import load_example

    exp = load_example(PPO)(opts)
    data = exp.data

    def interrupted(i):
        if i == 2:
            raise KeyboardInterrupt
        return data(i)
    from dataclasses import replace

    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(replace(exp, data=interrupted, prepare=None), opts, out=out)
    assert "stopped early" in out.getvalue() and "2 iterations" in out.getvalue()
    assert read_chrome_trace(tmp_path / "t.json")
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


def test_step_returning_one_value_twice_is_an_error():
    from graphrl.signatures import prompts_spec
    from graphrl.trace import Model, trace
    from graphrl.types import llama2

    def step(policy, prompts):
        r = policy.generate(prompts, max_new_tokens=4)
        return {"a": r, "b": r}
    with pytest.raises(TraceError, match="'a' and 'b' are the same value"):
        trace(step, [Model("policy", llama2("7b"), "policy")], prompts=prompts_spec(2, 8))


@pytest.mark.parametrize("kwargs, needle", [
    ({"epochz": 99}, "unknown argument 'epochz' (did you mean 'epochs'?)"),
    ({"epochs": 0}, "epochs=0 must be an int >= 1"),
    ({"epochs": 2.5}, "epochs=2.5 must be an int >= 1"),
    ({"clip": -0.1}, "clip=-0.1 must be a number >= 0"),
    ({"kl_coef": 0.1}, "unknown argument 'kl_coef'"),
])
def test_train_keyword_arguments_are_checked(kwargs, needle):
    from graphrl.signatures import prompts_spec
    from graphrl.trace import Model, trace
    from graphrl.types import llama2

    def step(policy, prompts):
        r = policy.generate(prompts, max_new_tokens=4)
        lp = policy.forward(r)
        return {"s": policy.train(loss="ppo", rollout=r, old_logprobs=lp, advantages=lp,
                                  **kwargs)}
    with pytest.raises(TraceError, match=None) as e:
        trace(step, [Model("policy", llama2("7b"), "policy", trainable=True)],
              prompts=prompts_spec(2, 8))
    assert "policy.train" in str(e.value) and needle in str(e.value), str(e.value)


def test_train_options_match_the_loss_functions():
    """Every built-in loss's function accepts exactly the options its LossDef declares
    (what the tracer lets a train call set)."""
    import inspect

    from graphrl.builtin_losses import BUILTIN

    for name, d in BUILTIN.items():
        params = inspect.signature(d.fn).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            continue   # **options: declared by the LossDef alone
        assert tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY) == tuple(d.options), name


@pytest.mark.parametrize("line, needle", [
    ('{"kind": "model", "model": "x"}', "model record lacks the field 'vocab'"),
    ('{"kind": "run", "model": "x", "phase": "train", "batch": 1, "seq": 2, "s": "x", '
     '"peak_gib": 1}', "run record has a field of the wrong type"),
    ("[1, 2]", "expected a JSON object per line"),
    ('{"kind": "run", ', "not a JSON line"),
])
def test_calibration_files_name_the_line_and_field(tmp_path, line, needle):
    from graphrl.calibrate import load

    path = tmp_path / "cal.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=None) as e:
        load(path)
    assert str(e.value).startswith(f"{path}:1: ") and needle in str(e.value)


def test_a_gpu_plan_run_on_cpu_says_so():
    """An H100 plan run on CPU Ray actors prints a note (graphrl.launch.device_note)."""
    from graphrl.cluster import ClusterSpec
    from graphrl.launch import device_note

    note = device_note(ClusterSpec.parse("1x8xH100"), "cpu")
    assert "priced for H100" in note and "run on CPU" in note
    assert device_note(ClusterSpec.parse("1x8xH100"), "cuda") == ""
    assert device_note(ClusterSpec.parse("1x4xcpu"), "cpu") == ""


def test_reward_rows_stop_at_the_first_error_and_a_hang_is_abandoned():
    import threading

    from graphrl.errors import OpError
    from graphrl.rewards import call_rows

    seen, release = [], threading.Event()

    def reward(k):
        seen.append(k)
        if k == 1:
            raise SystemExit(0)
        return 1.0
    with pytest.raises(OpError, match="reward function f.py:g raised on row 1: SystemExit"):
        call_rows(reward, [{"k": k} for k in range(4)], 5.0, lambda k: f"row {k}", "f.py:g")
    time.sleep(0.2)
    assert seen == [0, 1]          # nothing scored after the error

    start = time.monotonic()
    with pytest.raises(OpError, match="did not return within 0.2 s on row 0"):
        call_rows(lambda: release.wait(30), [{}], 0.2, lambda k: f"row {k}", "f.py:g")
    assert time.monotonic() - start < 5
    release.set()                  # let the abandoned thread end
    assert call_rows(lambda v: v, [{"v": 2}, {"v": True}], 5.0, str, "f") == [2.0, 1.0]
