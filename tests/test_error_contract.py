"""The command line's contract on bad input: exit 2, exactly one `graphrl: error:` line, no
Traceback, no hang, never a silent success. Hypothesis generates malformed arguments,
files (truncated / garbage / wrong-typed JSON and YAML, missing and unwritable paths) and
example files; every call is an in-process main() (no subprocess) on `show`/`compile`,
which trace the example without running models, so the whole file takes seconds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
PPO = str(ROOT / "examples" / "ppo.py")
TEXT = str(ROOT / "examples" / "text_grpo.py")
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
KINDS: set[str] = set()   # failure kinds exercised (reported by test_contract_counts)
COUNT = {"inputs": 0}


def check_usage_error(capsys, argv: list[str], kind: str) -> str:
    """main(argv) exits 2 with one graphrl: error: line and no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    COUNT["inputs"] += 1
    KINDS.add(kind)
    assert rc == 2, (argv, rc, err)
    assert "Traceback" not in err, (argv, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("graphrl: error:")]
    assert len(lines) == 1, (argv, err)
    return lines[0]


# -- generated file contents -----------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)
GOOD_CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
VALID_PLACEMENT = 'policy.train: {gpus: "0-3", dp: 4, zero: 1}\n'


def labelled(label: str, strategy: st.SearchStrategy) -> st.SearchStrategy:
    return strategy.map(lambda value: (label, value))


def _mutated_config(draw_field, draw_value):
    cfg = dict(GOOD_CONFIG)
    cfg[draw_field] = draw_value
    return json.dumps(cfg)


bad_config_text = st.one_of(
    labelled("garbage", st.binary(max_size=40).map(lambda b: b.decode("latin-1"))),
    labelled("truncated JSON", st.integers(1, len(json.dumps(GOOD_CONFIG)) - 1).map(
        lambda n: json.dumps(GOOD_CONFIG)[:n])),
    labelled("not an object", json_values.filter(lambda v: not isinstance(v, dict)).map(
        json.dumps)),
    labelled("field of wrong type or range", st.builds(
        _mutated_config, st.sampled_from(sorted(GOOD_CONFIG)),
        st.one_of(st.none(), st.booleans(), st.integers(-64, 0), st.floats(0.5, 2.5),
                  st.text(max_size=4), st.just([1])))),
)
bad_placement_text = st.one_of(
    labelled("truncated YAML", st.integers(1, len(VALID_PLACEMENT) - 2).map(
        lambda n: VALID_PLACEMENT[:n] + "{[")),
    labelled("not a mapping", json_values.filter(lambda v: not isinstance(v, dict)).map(
        json.dumps)),
    labelled("value of wrong type or range", st.builds(lambda k, v: json.dumps({"policy.train": {k: v}}),
              st.sampled_from(["dp", "tp", "pp", "zero", "micro_batches"]),
              st.one_of(st.booleans(), st.floats(0.1, 9.9).filter(lambda f: f != int(f)),
                        st.integers(-5, 0), st.text(max_size=4), st.just([2])))),
    labelled("unknown key", st.builds(lambda k: json.dumps({"policy.train": {k: 2}}),
              st.sampled_from(["dpp", "tensor", "zer0", "gpu", "micro_batch"]))),
    labelled("unknown call", st.builds(lambda c: json.dumps({c: {"dp": 1}}),
              st.sampled_from(["polciy.train", "policy.trian", "critic.generate", "x"]))),
)
bad_plan_text = st.one_of(
    labelled("garbage", st.binary(max_size=30).map(lambda b: b.decode("latin-1"))),
    labelled("wrong JSON", json_values.map(json.dumps)),
    labelled("field of wrong type", st.builds(lambda k, v: json.dumps({"format": "graphrl-plan/1", "graph": "", "cluster": {},
                                       "policy": "auto", "predicted_step_seconds": 1.0,
                                       "streams": [], "resident": [], "notes": [], k: v}),
              st.sampled_from(["graph", "cluster", "streams", "resident", "notes",
                               "predicted_step_seconds"]), json_values)),
)
bad_example_text = st.sampled_from([
    ("syntax error", "def build(options)\n    return 1\n"),
    ("build raises", "def build(options):\n    raise ValueError('broken example')\n"),
    ("build returns a non-Experiment", "def build(options):\n    return 3\n"),
    ("build not callable", "build = 3\n"),
    ("no build", "x = 1\n"),
    ("import error", "import no_such_module_graphrl\n"),
    ("KeyError in user code", "def build(options):\n    return {}['missing']\n"),
    ("binary file", "\0\x01garbage"),
])


@SETTINGS
@given(text=bad_config_text)
def test_model_config_files(tmp_path, capsys, text):
    label, text = text
    path = tmp_path / "config.json"
    path.write_text(text)
    check_usage_error(capsys, ["compile", PPO, "--cluster", "1x8xH100", "--model-config",
                               f"policy={path}"], f"--model-config: {label}")


@SETTINGS
@given(text=bad_config_text)
def test_estimate_config_files(tmp_path, capsys, text):
    label, text = text
    path = tmp_path / "config.json"
    path.write_text(text)
    check_usage_error(capsys, ["estimate", "--model-config", str(path), "--phase", "train",
                               "--batch", "1", "--seq", "8"], f"estimate config: {label}")


@SETTINGS
@given(text=bad_placement_text)
def test_placement_files(tmp_path, capsys, text):
    label, text = text
    path = tmp_path / "placement.yaml"
    path.write_text(text)
    line = check_usage_error(capsys, ["compile", PPO, "--cluster", "1x8xH100",
                                      "--placement", str(path)], f"placement: {label}")
    assert "placement" in line
    if label == "unknown key":
        key = next(iter(json.loads(text)["policy.train"]))
        assert f"unknown key {key!r}" in line, line


@SETTINGS
@given(text=bad_plan_text)
def test_plan_files(tmp_path, capsys, text):
    label, text = text
    path = tmp_path / "plan.json"
    path.write_text(text)
    line = check_usage_error(capsys, ["show", str(path)], f"plan.json: {label}")
    assert "plan.json" in line


@settings(max_examples=16, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=bad_example_text, command=st.sampled_from(["show", "compile"]))
def test_example_files(tmp_path, capsys, text, command):
    label, text = text
    path = tmp_path / "example.py"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    extra = ["--cluster", "1x8xH100"] if command == "compile" else []
    check_usage_error(capsys, [command, str(path), *extra], f"example: {label}")


BAD_ARGS = st.one_of(
    st.builds(lambda v: ["compile", PPO, "--cluster", v],
              st.sampled_from(["", "x", "0x8xH100", "1x0xH100", "1x8xV999", "-1x8xH100",
                               "100000x8xH100", "1x8", "2.5x8xH100"])),
    st.builds(lambda v: ["compile", PPO, "--cluster", "1x8xH100", "--model-size", v],
              st.sampled_from(["polciy=70b", "policy=71b", "huge", "critc=7b", "=", ","])),
    st.builds(lambda v: ["compile", PPO, "--cluster", "1x8xH100", "--model-config", v],
              st.sampled_from(["policy", "=x.json", "policy=", "foo=/nonexistent.json",
                               "policy=/nonexistent.json", "policy=/proc"])),
    st.builds(lambda f, v: ["show", PPO, f, v],
              st.sampled_from(["--iterations", "--batch-size", "--prompt-len"]),
              st.sampled_from(["0", "-3", "2.7", "x", "", "1e99"])),
    st.builds(lambda f, v: ["estimate", "--model-config", "/nonexistent.json", "--phase",
                            "train", "--batch", "1", "--seq", "8", f, v],
              st.sampled_from(["--tp", "--pp", "--dp", "--zero", "--batch", "--gpu"]),
              st.sampled_from(["0", "-1", "2.5", "five", "7"])),
    st.builds(lambda v: ["run", PPO, v, "x"],
              st.sampled_from(["--cluster", "--placement", "--address", "--policy",
                               "--call-timeout"])),
    st.builds(lambda b, f, v: ["run", PPO, "--backend", b, f, v],
              st.sampled_from(["local", "ray"]), st.sampled_from(["--metrics", "--trace"]),
              st.sampled_from(["/nonexistent-dir/m.jsonl", "/proc/graphrl/m.jsonl", "/tmp",
                               "/", "/proc/version"])),
    st.builds(lambda v: ["compile", PPO, "--cluster", "1x8xH100", "--dump", v],
              st.sampled_from(["/proc/x", "/proc/version", "/proc/self/status/x"])),
    st.builds(lambda c: [c], st.sampled_from(["frobnicate", "runn", "--nope"])),
    st.builds(lambda c, f, v: [c, PPO, f, v], st.sampled_from(["show", "compile", "run"]),
              st.sampled_from(["--seed", "--batch-size"]),
              st.sampled_from(["99999999999999999999", "-1", "10000000", "4294967296",
                               "1e3", "0x10"])),
    st.builds(lambda f, v: ["check-model", "/nonexistent", f, v],
              st.sampled_from(["--tp", "--pp", "--dp", "--prompts", "--seq", "--timeout",
                               "--seed"]),
              st.sampled_from(["0", "-2", "nan", "x", "99999999999999999999"])),
    st.builds(lambda v: ["run", TEXT, "--reward-timeout", v],
              st.sampled_from(["0", "-1", "nan", "inf", "x", ""])),
    st.builds(lambda e: ["show", e],
              st.sampled_from(["/nonexistent.py", "/nonexistent.json", str(ROOT / "README.md"),
                               "/proc"])),
)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=BAD_ARGS)
def test_bad_arguments(capsys, argv):
    flag = next((a for a in reversed(argv[1:]) if a.startswith("--")), "")
    kind = f"{argv[0]} {flag or 'argument'}"
    check_usage_error(capsys, argv, f"bad argument: {kind}")


# -- text jobs: --model, --data, --prompt-field, --reward, --save; graphrl plot --------


@pytest.fixture(scope="module")
def text_job(tmp_path_factory):
    """A tiny HF model directory, a good prompts file and a good reward file."""
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from word_problems import write_problems, write_tiny_llama

    base = tmp_path_factory.mktemp("text_job")
    model = write_tiny_llama(base / "model", hidden=16, layers=1)
    data = write_problems(base / "data.jsonl", n=16)
    reward = base / "reward.py"
    reward.write_text("def score(response, answer):\n    return float(answer in response)\n")
    return {"model": str(model), "data": str(data), "reward": str(reward), "base": base}


bad_jsonl_lines = st.one_of(
    labelled("garbage line", st.binary(min_size=1, max_size=30).map(
        lambda b: b.decode("latin-1").replace("\n", " "))),
    labelled("not an object", json_values.filter(lambda v: not isinstance(v, dict)).map(
        json.dumps)),
    labelled("no prompt field", st.dictionaries(st.sampled_from(["question", "answer", "x"]),
                                                json_values, max_size=2).map(json.dumps)),
    labelled("not UTF-8", st.binary(min_size=1, max_size=20).map(
        lambda b: b"{\"prompt\": \"" + b.replace(b"\n", b" ") + b"\xff\"}").map(
        lambda b: b.decode("utf-8", "surrogateescape"))),
    labelled("prompt not a string", st.one_of(st.none(), st.integers(), st.just(""),
                                              st.just("   "), st.just([1])).map(
        lambda v: json.dumps({"prompt": v}))),
)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(line=bad_jsonl_lines, at=st.integers(0, 3))
def test_data_files(text_job, tmp_path, capsys, line, at):
    label, line = line
    good = Path(text_job["data"]).read_text().splitlines()[:3]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(good[:at] + [line] + good[at:]) + "\n",
                    errors="surrogateescape")
    err = check_usage_error(capsys, ["show", TEXT, "--model", f"policy={text_job['model']}",
                                     "--data", str(path)], f"--data: {label}")
    assert str(path) in err and f"line {at + 1}" in err, err


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=bad_config_text)
def test_model_directories_with_bad_configs(text_job, tmp_path, capsys, text):
    import shutil

    label, text = text
    model = tmp_path / "model"
    if not model.exists():
        shutil.copytree(text_job["model"], model)
    (model / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    check_usage_error(capsys, ["show", TEXT, "--model", f"policy={model}", "--data",
                               text_job["data"]], f"--model dir: config {label}")


def text_job_argv(job: dict, case: str) -> list[str]:
    """One malformed text-job command line (`case` names what is wrong)."""
    base, model, data, reward = job["base"], job["model"], job["data"], job["reward"]
    (base / "weights_missing").mkdir(exist_ok=True)
    (base / "weights_missing" / "config.json").write_text(
        (Path(model) / "config.json").read_text())
    (base / "broken.py").write_text("def score(response:\n")
    (base / "prompts.txt").write_text("hello\n")
    (base / "empty.jsonl").write_text("")
    (base / "a_file").write_text("x")
    (base / "rewards.py").write_text(
        "import sys, time\n"
        "def hangs(response):\n    while True:\n        time.sleep(0.01)\n"
        "def exits(response):\n    sys.exit(0)\n"
        "def interrupts(response):\n    raise KeyboardInterrupt\n"
        "def huge(response):\n    return 1e300\n"
        "def nan(response):\n    return float('nan')\n")
    rewards = str(base / "rewards.py")
    (base / "m_not_utf8.jsonl").write_bytes(b'{"iteration": 0, "reward_mean": 0.1}\n'
                                            b'{"iteration": 1, "note": "\xff"}\n')
    if not (base / "empty.parquet").exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), base / "empty.parquet")
    (base / "earlier_save").mkdir(exist_ok=True)
    (base / "earlier_save" / "config.json").write_text("{}")
    (base / "m.jsonl").write_text('{"iteration": 0, "reward_mean": 0.1}\n'
                                  '{"iteration": 1, "reward_mean": 0.2}\n')
    ok = ["--model", f"policy={model}", "--data", data]
    tiny_run = ["--iterations", "2", "--batch-size", "2", "--quiet"]
    cases = {
        "--model without =": ["show", TEXT, "--model", "policy", "--data", data],
        "--model empty role": ["show", TEXT, "--model", f"={model}", "--data", data],
        "--model unknown role": ["show", TEXT, "--model", f"polcy={model}", "--data", data],
        "--model missing dir": ["show", TEXT, "--model", "policy=/nonexistent", "--data", data],
        "--model a file": ["show", TEXT, "--model", f"policy={base / 'a_file'}", "--data", data],
        "--model no weights": ["run", TEXT, "--model", f"policy={base / 'weights_missing'}",
                               "--data", data, "--iterations", "1", "--quiet"],
        "--data missing": ["show", TEXT, "--model", f"policy={model}", "--data", "/nonexistent.jsonl"],
        "--data a directory": ["show", TEXT, "--model", f"policy={model}", "--data", str(base)],
        "--data unknown format": ["show", TEXT, "--model", f"policy={model}", "--data",
                                  str(base / "prompts.txt")],
        "--data empty": ["show", TEXT, "--model", f"policy={model}", "--data",
                         str(base / "empty.jsonl")],
        "--prompt-field unknown": ["show", TEXT, *ok, "--prompt-field", "questoin"],
        "--reward without :FUNCTION": ["show", TEXT, *ok, "--reward", reward],
        "--reward missing file": ["show", TEXT, *ok, "--reward", "/nonexistent.py:score"],
        "--reward unknown function": ["show", TEXT, *ok, "--reward", f"{reward}:scor"],
        "--reward syntax error": ["show", TEXT, *ok, "--reward", f"{base / 'broken.py'}:score"],
        "--save is a file": ["run", TEXT, *ok, "--save", str(base / "a_file"), "--quiet"],
        "--save parent missing": ["run", TEXT, *ok, "--save", "/nonexistent/out", "--quiet"],
        "--save unwritable": ["run", TEXT, *ok, "--save", "/proc/out", "--quiet"],
        "--reward never returns": ["run", TEXT, *ok, "--reward", f"{rewards}:hangs",
                                   "--reward-timeout", "0.3", *tiny_run],
        "--reward calls sys.exit(0)": ["run", TEXT, *ok, "--reward", f"{rewards}:exits",
                                       *tiny_run],
        "--reward raises KeyboardInterrupt": ["run", TEXT, *ok, "--reward",
                                              f"{rewards}:interrupts", *tiny_run],
        "--reward returns 1e300": ["run", TEXT, *ok, "--reward", f"{rewards}:huge", *tiny_run],
        "--reward returns nan": ["run", TEXT, *ok, "--reward", f"{rewards}:nan", *tiny_run],
        "--data empty Parquet": ["show", TEXT, "--model", f"policy={model}", "--data",
                                 str(base / "empty.parquet")],
        "--save over an earlier output": ["run", TEXT, *ok, "--save",
                                          str(base / "earlier_save"), *tiny_run],
        "plot not UTF-8": ["plot", str(base / "m_not_utf8.jsonl")],
        "plot missing file": ["plot", "/nonexistent/m.jsonl"],
        "plot garbage file": ["plot", str(base / "prompts.txt")],
        "plot empty file": ["plot", str(base / "empty.jsonl")],
        "plot output unwritable": ["plot", str(base / "m.jsonl"), "-o", "/proc/x.png"],
        "plot unknown picture format": ["plot", str(base / "m.jsonl"), "-o", str(base / "x.foo")],
    }
    return cases[case]


TEXT_CASES = ["--model without =", "--model empty role", "--model unknown role",
              "--model missing dir", "--model a file", "--model no weights", "--data missing",
              "--data a directory", "--data unknown format", "--data empty",
              "--prompt-field unknown", "--reward without :FUNCTION", "--reward missing file",
              "--reward unknown function", "--reward syntax error", "--reward never returns",
              "--reward calls sys.exit(0)", "--reward raises KeyboardInterrupt",
              "--reward returns 1e300", "--reward returns nan", "--data empty Parquet",
              "--save over an earlier output", "plot not UTF-8", "--save is a file",
              "--save parent missing", "--save unwritable", "plot missing file",
              "plot garbage file", "plot empty file", "plot output unwritable",
              "plot unknown picture format"]


@pytest.mark.parametrize("case", TEXT_CASES)
def test_text_job_arguments(text_job, capsys, case):
    err = check_usage_error(capsys, text_job_argv(text_job, case), f"text job: {case}")
    assert len(err) < 600, err
    named = {"--model unknown role": "did you mean 'policy'", "--reward unknown function":
             "did you mean 'score'", "--prompt-field unknown": "--prompt-field",
             "plot output unwritable": "/proc/x.png", "--save unwritable": "/proc",
             "--reward never returns": "rewards.py:hangs did not return within 0.3 s",
             "--reward calls sys.exit(0)": "rewards.py:exits raised on",
             "--reward raises KeyboardInterrupt": "KeyboardInterrupt",
             "--reward returns 1e300": "returned 1e+300",
             "--reward returns nan": "returned nan",
             "--data empty Parquet": "no rows (an empty Parquet file)",
             "--save over an earlier output": "--overwrite",
             "plot not UTF-8": "line 2: not UTF-8 text (byte 0xff"}
    assert named.get(case, "") in err, err
    if case.startswith("--reward") and "run" in text_job_argv(text_job, case):
        assert "iteration 0: " in err and "data.jsonl line " in err, err


@pytest.mark.parametrize("command", ["show", "compile"])
def test_graphrl_bug_shows_a_traceback_and_says_so(tmp_path, capsys, monkeypatch, command):
    """An exception inside graphrl itself (here: the graph verifier made uncallable, so
    graphrl's tracer raises TypeError) is reported as a graphrl bug, not the user's."""
    import graphrl.verify

    monkeypatch.setattr(graphrl.verify, "verify_graph", None)
    extra = ["--cluster", "1x8xH100"] if command == "compile" else []
    rc = main([command, PPO, *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" in err and "a bug in graphrl" in err


def test_user_code_error_shows_only_user_frames(tmp_path, capsys):
    path = tmp_path / "ex.py"
    path.write_text("def helper():\n    raise KeyError('nope')\n\n"
                    "def build(options):\n    return helper()\n")
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "graphrl/" not in err.replace(str(path), "")
    assert f'File "{path}", line 2, in helper' in err
    assert f"your code ({path}, line 2) raised KeyError" in err
    assert main(["--debug", "show", str(path)]) == 2     # --debug: every frame
    err = capsys.readouterr().err
    assert "Traceback" in err and "example_file.py" in err


def test_nonfinite_training_stops_the_run(text_job, tmp_path, capsys):
    """Rewards of 3e38 are finite float32 numbers, but their group statistics overflow:
    the run stops at that iteration naming the advantages, before the policy trains on
    them; no NaN reaches the metrics."""
    rewards = tmp_path / "big.py"
    rewards.write_text("def big(response):\n    return 3e38\n")
    metrics = tmp_path / "m.jsonl"
    rc = main(["run", TEXT, "--model", f"policy={text_job['model']}", "--data",
               text_job["data"], "--reward", f"{rewards}:big", "--iterations", "2",
               "--batch-size", "2", "--quiet", "--metrics", str(metrics)])
    err = capsys.readouterr().err
    COUNT["inputs"] += 1
    KINDS.add("non-finite training")
    assert rc == 1 and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("graphrl: error:")]
    assert "iteration 0: group_advantages produced" in line, line
    assert "non-finite values (NaN or inf) in advantages (node" in line, line
    assert "nan" not in metrics.read_text().lower()


@pytest.mark.parametrize("key, value, needle", [
    ("policy_stats/loss", float("nan"), "iteration 3: policy_stats/loss is nan (from "
                                        "policy.train"),
    ("policy_stats/kl", float("inf"), "iteration 3: policy_stats/kl is inf (from "
                                      "policy.train"),
    ("reward_mean", float("-inf"), "iteration 3: the reward's mean is -inf (from score"),
])
def test_nonfinite_statistics_name_iteration_quantity_and_call(key, value, needle):
    """The per-iteration check of the metrics row (what a train call returns: loss, KL)."""
    from graphrl.errors import ExecutionError
    from graphrl.finite import check_finite
    from graphrl.signatures import prompts_spec
    from graphrl.trace import Model, trace
    from graphrl.types import llama2

    from graphrl.ops import group_advantages

    def ppo(policy, prompts):
        rollout = policy.generate(prompts, max_new_tokens=4, samples=2)
        lp = policy.forward(rollout)
        scores = _score_op()(rollout)
        adv = group_advantages(rollout, scores, group_size=2)
        return {"reward": scores, "policy_stats": policy.train(
            loss="ppo", rollout=rollout, old_logprobs=lp, advantages=adv)}
    program = trace(ppo, [Model("policy", llama2("7b"), "policy", trainable=True)],
                    prompts=prompts_spec(2, 8))
    row = {"iteration": 3, "reward_mean": 0.5, "policy_stats/loss": 0.1, key: value}
    with pytest.raises(ExecutionError) as e:
        check_finite(row, 3, program.graph, "reward")
    assert needle in str(e.value), str(e.value)
    check_finite({**row, key: 0.0}, 3, program.graph, "reward")   # finite: no error


# -- the Python API: constructors and traced calls check their arguments ---------------
def check_api_error(make, kind: str) -> str:
    """make() raises a graphrl error that the command line reports as one line, exit 2."""
    import io

    from graphrl.cli.error_report import report
    from graphrl.errors import GraphRLError

    COUNT["inputs"] += 1
    KINDS.add(kind)
    with pytest.raises(GraphRLError) as e:
        make()
    err = io.StringIO()
    assert report(e.value, err=err) == 2
    (line,) = err.getvalue().splitlines()
    return line


bad_numbers = st.one_of(st.integers(-3, 0), st.floats(0.5, 9.5),
                        st.just("zero"), st.just(True), st.none(), st.just(float("nan")))


def _valid_option(field, value) -> bool:
    import math

    if value is None:
        return field in ("iterations", "batch_size", "prompt_len", "reward_timeout",
                         "call_timeout")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if field.endswith("timeout"):
        return math.isfinite(value) and value > 0
    least = 0 if field in ("seed", "max_restarts", "staleness") else 1
    return isinstance(value, int) and value >= least and field not in ("backend", "device")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(field=st.sampled_from(["iterations", "seed", "batch_size", "prompt_len", "keep",
                              "max_restarts", "staleness", "reward_timeout", "call_timeout",
                              "backend", "device"]),
       value=bad_numbers)
def test_run_options(field, value):
    from graphrl.experiment import RunOptions

    if field == "seed" and value is None:
        value = 2**40    # past the seeds numpy takes
    if _valid_option(field, value):
        return
    line = check_api_error(lambda: RunOptions(**{field: value}), f"RunOptions.{field}")
    assert field in line and f"--{field.replace('_', '-')}" in line, line


@settings(max_examples=30, deadline=None, derandomize=True)
@given(case=st.one_of(
    st.builds(lambda v: ("role", {"role": v}),
              st.sampled_from(["wizard", "polciy", "", None])),
    st.builds(lambda v: ("head", {"head": v}), st.sampled_from(["lm_head", "values", 3])),
    st.builds(lambda v: ("engine", {"engine": v}), st.sampled_from(["nope", "HF", "vllm"])),
    st.builds(lambda k, v: (k, {"options": {k: v}}),
              st.sampled_from(["lr", "weight_decay", "grad_clip", "betas"]),
              st.sampled_from([-1, -1e-3, float("inf"), "fast", (0.9,), (1.5, 0.9)])),
    st.builds(lambda k: (k, {"options": {k: 1e-3}}),
              st.sampled_from(["lrr", "learning_rate", "warmup", "weightdecay"])),
    st.builds(lambda v: ("name", {"name": v}), st.sampled_from(["", "a b", 3, "1x"]))))
def test_model_declarations(case):
    from graphrl.trace import Model
    from graphrl.types import llama2

    what, fields = case
    args = {"name": "policy", "config": llama2("7b"), "role": "policy", **fields}
    if what == "grad_clip" and fields["options"]["grad_clip"] is None:
        return
    line = check_api_error(lambda: Model(**args), f"Model {what}")
    assert repr(fields.get("name", "policy")) in line or "model policy" in line, line


def _score_op():
    from graphrl.ops import op
    from graphrl.signatures import ROLLOUT, SCORES
    from graphrl.types import Field

    return op("score", (ROLLOUT,), (("score", SCORES, (Field("score", "f32",
                                                              per_token=False),)),)
              )(lambda rollout: None)


def _step_with(generate: dict, group: dict):
    from graphrl.ops import group_advantages

    score = _score_op()

    def step(policy, prompts):
        rollout = policy.generate(prompts, **generate)
        return {"adv": group_advantages(rollout, score(rollout), **group)}
    return step


@pytest.mark.parametrize("generate, group, needle", [
    ({"max_new_token": 4}, {"group_size": 2}, "unknown argument 'max_new_token' (did you "
                                              "mean 'max_new_tokens'?)"),
    ({}, {"group_size": 2}, "missing a required argument: 'max_new_tokens'"),
    ({"max_new_tokens": 4, "sample": 2}, {"group_size": 2}, "did you mean 'samples'"),
    ({"max_new_tokens": 4, "samples": 2}, {"group_size": 0}, "group_size=0 must be"),
    ({"max_new_tokens": 4, "samples": 2}, {"group_size": 3}, "does not divide the "
                                                             "rollout's 4 rows"),
    ({"max_new_tokens": 4, "samples": 2}, {"group_sise": 2}, "did you mean 'group_size'"),
])
def test_traced_call_arguments(generate, group, needle):
    from graphrl.signatures import prompts_spec
    from graphrl.trace import Model, trace
    from graphrl.types import llama2

    line = check_api_error(lambda: trace(_step_with(generate, group),
                                         [Model("policy", llama2("7b"), "policy")],
                                         prompts=prompts_spec(2, 8)), "traced call arguments")
    assert needle in line, line


def _experiment(**fields):
    from graphrl.experiment import Experiment

    return Experiment(**{"name": "exp", "step": lambda prompts: {}, "models": (),
                         "inputs": {}, "data": lambda i: {}, "reward": "reward", **fields})


@pytest.mark.parametrize("make, needle", [
    (lambda: __import__("graphrl").prompts_spec(0, 8), "batch=0 must be an int >= 1"),
    (lambda: __import__("graphrl").prompts_spec(2, -1), "seq=-1 must be an int >= 1"),
    (lambda: __import__("graphrl").run(None, iterationz=3), "did you mean 'iterations'"),
    (lambda: __import__("graphrl").run(None, iterations=0), "iterations (--iterations)=0"),
    (lambda: __import__("graphrl").run(None, iterations=-1), "iterations (--iterations)=-1"),
    (lambda: _experiment(iterations=0), "iterations=0 must be an int >= 1"),
    (lambda: _experiment(data=[1, 2]), "data must be callable"),
    (lambda: _experiment(name="my run"), "name must be a Python identifier"),
])
def test_api_calls(make, needle):
    assert needle in check_api_error(make, "API call")


# -- files graphrl reads: model weights, checkpoints -----------------------------------
def _corrupt_weights(directory: Path, how: str, at: float) -> None:
    """Damage a copy of the tiny model's weights in the way `how` names; `at` in [0, 1)
    picks where (which byte, which tensor)."""
    import torch
    from safetensors.torch import load_file, save_file

    file = directory / "model.safetensors"
    data = file.read_bytes()
    if how == "truncated safetensors":
        file.write_bytes(data[:int(len(data) * at)])
    elif how == "garbage safetensors":
        file.write_bytes(bytes((i * 37 + int(at * 255)) % 256 for i in range(64)))
    elif how in ("NaN weight", "inf weight"):
        state = load_file(file)
        name = sorted(state)[int(at * len(state))]
        state[name].view(-1)[int(at * state[name].numel())] = float(
            "nan" if how == "NaN weight" else "inf")
        save_file(state, file, metadata={"format": "pt"})
    elif how in ("pickle the safe loader refuses", "garbage pytorch_model.bin"):
        file.unlink()
        (directory / "pytorch_model.bin").write_bytes(
            b"\x80\x04cos\nsystem\n." if how.startswith("pickle") else data[:int(64 * at) + 1])
    elif how == "config with more layers":
        cfg = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    elif how == "config shapes disagree":
        cfg = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(
            {**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    torch.manual_seed(0)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(how=st.sampled_from(["truncated safetensors", "garbage safetensors", "NaN weight",
                            "inf weight", "pickle the safe loader refuses",
                            "garbage pytorch_model.bin", "config with more layers",
                            "config shapes disagree"]),
       at=st.floats(0.05, 0.95))
def test_model_directories_with_bad_weights(text_job, tmp_path_factory, capsys, how, at):
    import shutil

    model = tmp_path_factory.mktemp("bad_model") / "model"
    shutil.copytree(text_job["model"], model)
    _corrupt_weights(model, how, at)
    line = check_usage_error(capsys, ["run", TEXT, "--model", f"policy={model}", "--data",
                                      text_job["data"], "--iterations", "1", "--batch-size",
                                      "2", "--quiet"], f"--model dir: {how}")
    assert f"model directory {model}" in line and len(line) < 600, line
    if how in ("NaN weight", "inf weight"):
        assert "model.safetensors holds 1 non-finite value" in line, line


def test_checkpoint_files_corrupt_behind_a_matching_manifest(text_job, tmp_path, capsys):
    """A checkpoint whose file was damaged and its manifest rewritten to match (so the
    checksums, the manifest's own included, pass): unreadable or NaN tensors are named at --resume."""
    import shutil

    import torch

    from graphrl.checkpoint import SELF_SUM, manifest_sum, sha256_file

    run = ["run", TEXT, "--model", f"policy={text_job['model']}", "--data", text_job["data"],
           "--iterations", "1", "--batch-size", "2", "--quiet"]
    assert main(run + ["--checkpoint-dir", str(tmp_path / "ck")]) == 0
    (good,) = (tmp_path / "ck").iterdir()
    for how, needle in (("garbage", "cannot read it"), ("nan", "holds NaN or inf")):
        ck = tmp_path / how / good.name
        shutil.copytree(good, ck)
        file = ck / "models" / "policy.pt"
        if how == "garbage":
            file.write_bytes(b"not a torch file" * 8)
        else:
            state = torch.load(file, weights_only=True)
            next(iter(state["weights"].values())).view(-1)[0] = float("nan")
            torch.save(state, file)
        manifest = json.loads((ck / "manifest.json").read_text())
        manifest["files"]["models/policy.pt"] = {"bytes": file.stat().st_size,
                                                 "sha256": sha256_file(file)}
        manifest[SELF_SUM] = manifest_sum(manifest)   # rewritten whole, its own sum too
        (ck / "manifest.json").write_text(json.dumps(manifest))
        # one iteration more than the checkpoint holds: a resume with nothing left to
        # run reads no model file
        line = check_usage_error(capsys, run + ["--resume", str(ck), "--iterations", "2"],
                                 f"checkpoint: {how} file behind a matching manifest")
        assert f"checkpoint file {file}" in line and needle in line, line


# -- files graphrl writes: a full disk (a file-size limit: writes fail as they would) ---
FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {examples!r})
from graphrl.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
run = {run!r}
for flag, target in {targets!r}:
    rc = main(run + [flag, target])
    print("RESULT", flag, rc, flush=True)
"""


def test_full_disk_while_writing_outputs(text_job, tmp_path):
    """--metrics, --trace, --checkpoint-dir and --save each fail with one line naming the
    flag and the path when the disk refuses a write mid-run (one subprocess: the
    file-size limit must not touch pytest)."""
    import subprocess
    import sys

    run = ["run", TEXT, "--model", f"policy={text_job['model']}", "--data", text_job["data"],
           "--iterations", "4", "--batch-size", "2", "--quiet"]
    targets = [("--metrics", str(tmp_path / "m.jsonl")), ("--trace", str(tmp_path / "t.json")),
               ("--checkpoint-dir", str(tmp_path / "ck")), ("--save", str(tmp_path / "out"))]
    script = FULL_DISK.format(examples=str(ROOT / "examples"), run=run, targets=targets)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ,
                                            "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("graphrl: error:")]
    results = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert [r[1:] for r in results] == [[flag, "2"] for flag, _ in targets], proc.stdout
    assert len(lines) == len(targets), lines
    for (flag, path), line in zip(targets, lines):
        COUNT["inputs"] += 1
        KINDS.add(f"full disk: {flag}")
        assert f"{flag} {path}: cannot write (" in line, line
    assert not list(tmp_path.glob(".out.tmp-*")), "a failed --save leaves no temporary folder"


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.one_of(st.integers(1, 4096), st.integers(4097, 10**7)),
       new=st.one_of(st.just(0), st.integers(1, 64), st.integers(5000, 10**6)),
       batch=st.integers(1, 4096))
def test_estimate_prices_only_what_the_model_holds(tmp_path, capsys, seq, new, batch):
    """A call past the model's context is refused, not priced; 'fits' means what compile
    plans with (the GPU's memory less its headroom)."""
    config = {**GOOD_CONFIG, "hidden_size": 4096, "num_hidden_layers": 32,
              "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
              "max_position_embeddings": 4096}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    phase = ["--phase", "generate", "--new-tokens", str(new)] if new else ["--phase", "train"]
    argv = ["estimate", "--model-config", str(path), *phase, "--batch", str(batch), "--seq",
            str(seq), "--json"]
    if seq + new > 4096:
        line = check_usage_error(capsys, argv, "estimate past the context")
        assert f"= {seq + new} tokens exceeds the model's context of 4096" in line, line
        return
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    usable = out["gpu_memory_gib"] * (1 - out["headroom"])
    assert out["headroom"] > 0 and out["fits"] == (out["peak_memory_gib"] <= usable), out



@pytest.mark.parametrize("dp, micro", [(1, 10**12), (8, 1), (2, 3)])
def test_estimate_batch_covers_the_strategy(tmp_path, capsys, dp, micro):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GOOD_CONFIG))
    line = check_usage_error(capsys, ["estimate", "--model-config", str(path), "--phase",
                                      "train", "--batch", "5", "--seq", "8", "--dp", str(dp),
                                      "--micro-batches", str(micro)],
                             "estimate batch below dp x micro-batches")
    assert f"--batch 5 is fewer sequences than --dp {dp} x --micro-batches {micro}" in line

def test_contract_counts():
    """Runs last in this file: how many malformed inputs the tests above generated."""
    print(f"\nerror contract: {COUNT['inputs']} malformed inputs, "
          f"{len(KINDS)} failure kinds: {sorted(KINDS)}")
    assert COUNT["inputs"] >= 200 or COUNT["inputs"] == 0  # 0: run alone with -k
