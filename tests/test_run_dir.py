"""Issue 21, items 2 and 3: --logger jsonl,tensorboard,wandb and --run-dir DIR.

One text GRPO run (tiny Llama, 3 iterations) writes a run directory with every logger;
TensorBoard's own reader and wandb's own reader of its offline run file read them back
and must give the metrics rows; `graphrl run --config DIR/config.json` reruns it with the
same rows; a changed data file or model config is refused before anything runs."""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import pytest

from graphrl.cli import main
from conftest import load_build
from word_problems import write_problems, write_tiny_llama

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text_grpo.py"
ITERATIONS = 3


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def curve(rows: list[dict]) -> list[dict]:
    """The rows without wall-clock timings."""
    return [{k: v for k, v in r.items() if k != "step_seconds" and not k.startswith("seconds/")}
            for r in rows]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    return (write_tiny_llama(base / "tiny", seed=0),
            write_problems(base / "problems.jsonl", n=32, seed=1))


def args(model: Path, data: Path, *more: str) -> list[str]:
    return ["--model", f"policy={model}", "--data", str(data), "--iterations",
            str(ITERATIONS), "--batch-size", "4", "--response-len", "3", "--quiet", *more]


@pytest.fixture(scope="module")
def run1(inputs, tmp_path_factory):
    """The run every test reads: all three loggers, in a run directory."""
    model, data = inputs
    run_dir = tmp_path_factory.mktemp("runs") / "r1"
    assert main(["run", str(EXAMPLE), *args(model, data), "--run-dir", str(run_dir),
                 "--logger", "jsonl,tensorboard,wandb"]) == 0
    return run_dir


def test_run_dir_holds_the_run_and_its_config(run1, inputs):
    model, data = inputs
    assert sorted(p.name for p in run1.iterdir()) == [
        "checkpoints", "config.json", "metrics.jsonl", "save", "tensorboard", "trace.json",
        "wandb"]
    rows = rows_of(run1 / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert json.loads((run1 / "trace.json").read_text())["traceEvents"]
    assert (run1 / "save" / "model.safetensors").is_file()
    config = json.loads((run1 / "config.json").read_text())
    assert config["example"] == {"path": str(EXAMPLE), "sha256": sha256(EXAMPLE)}
    assert config["options"]["iterations"] == ITERATIONS and config["options"]["metrics"] is None
    assert config["resolved"]["metrics"] == str(run1 / "metrics.jsonl")
    assert config["models"]["policy"]["dir"] == str(model)
    assert config["models"]["policy"]["config_sha256"] == sha256(model / "config.json")
    assert config["files"]["data"] == {"path": str(data), "sha256": sha256(data)}
    for lib in ("torch", "transformers", "ray", "tensorboard", "wandb"):
        assert config["versions"][lib] == metadata.version(lib)
    calls = config["plan"]["calls"]
    assert config["plan"]["backend"] == "local" and any("generate[policy]" in c for c in calls)


def test_tensorboard_events_read_back_equal_the_rows(run1):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run1 / "tensorboard"),
                              size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = rows_of(run1 / "metrics.jsonl")
    numeric = {k for k in rows[0] if k != "iteration"}
    assert set(events.Tags()["scalars"]) == numeric
    for key in numeric:
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(r["iteration"], float(np.float32(r[key]))) for r in rows], key
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == json.loads((run1 / "config.json").read_text())


def wandb_records(run_dir: Path) -> tuple[dict, list[dict], int | None]:
    """The config, the history rows and the exit code of the offline W&B run, read with
    wandb's own reader of its run file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    [file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(file))
    config, history, exit_code = {}, [], None
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            assert (record.run.display_name, record.run.run_group) == (run_dir.name, "text_grpo")
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return config, history, exit_code


def test_wandb_offline_run_reads_back_equal_to_the_rows(run1):
    config, history, exit_code = wandb_records(run1)
    assert exit_code == 0
    recorded = json.loads((run1 / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "_wandb"} == recorded
    rows = rows_of(run1 / "metrics.jsonl")
    assert [h["_step"] for h in history] == [r["iteration"] for r in rows]
    for h, r in zip(history, rows):
        assert {k: v for k, v in h.items() if not k.startswith("_")} == \
            {k: v for k, v in r.items() if k != "iteration"}


def test_config_reruns_the_run_with_the_same_rows(run1, tmp_path, capsys):
    capsys.readouterr()
    assert main(["run", "--config", str(run1 / "config.json")]) == 2   # r1 holds a run
    assert "holds a run already" in capsys.readouterr().err
    rerun = tmp_path / "r2"
    assert main(["run", "--config", str(run1 / "config.json"), "--run-dir", str(rerun),
                 "--logger", "jsonl"]) == 0
    out = capsys.readouterr().out
    assert f"--run-dir {rerun} (recorded {run1})" in out
    assert f"{ITERATIONS} iteration(s) equal to the recorded run's" in out
    assert curve(rows_of(rerun / "metrics.jsonl")) == curve(rows_of(run1 / "metrics.jsonl"))
    again = json.loads((rerun / "config.json").read_text())
    assert again["options"]["config"] == str(run1 / "config.json")
    assert not (rerun / "tensorboard").exists()
    # --overwrite replaces the rerun's run: its old checkpoints go, its rows are new
    assert main(["run", "--config", str(run1 / "config.json"), "--run-dir", str(rerun),
                 "--logger", "jsonl", "--overwrite", "--iterations", "2"]) == 0
    assert "2 iteration(s) equal to the recorded run's" in capsys.readouterr().out
    assert curve(rows_of(rerun / "metrics.jsonl")) == curve(rows_of(run1 / "metrics.jsonl"))[:2]
    assert [p.name for p in (rerun / "checkpoints").iterdir()] == ["ckpt-00000002"]


def test_config_refuses_a_changed_data_file_or_model(run1, inputs, tmp_path, capsys):
    model, data = inputs
    changed = tmp_path / "changed.jsonl"
    changed.write_text(data.read_text())
    moved_model = tmp_path / "model"
    moved_model.mkdir()
    for f in model.iterdir():
        (moved_model / f.name).write_bytes(f.read_bytes())
    record = json.loads((run1 / "config.json").read_text())
    record["options"]["data"] = record["files"]["data"]["path"] = str(changed)
    record["options"]["model_dirs"] = [["policy", str(moved_model)]]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(record))
    rerun = ["run", "--config", str(config), "--run-dir", str(tmp_path / "r3")]
    with changed.open("a") as f:
        f.write(json.dumps({"prompt": "Tom has 1 apple .", "answer": "1"}) + "\n")
    capsys.readouterr()
    assert main(rerun) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"data file {changed} changed since" in err
    changed.write_text(data.read_text())
    cfg = json.loads((moved_model / "config.json").read_text())
    (moved_model / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    assert main(rerun) == 2
    err = capsys.readouterr().err.strip()
    assert f"{moved_model}/config.json changed since the recorded run" in err
    assert not (tmp_path / "r3" / "config.json").exists()


@pytest.mark.parametrize("logger,package", [("tensorboard", "tensorboard"),
                                            ("wandb", "wandb")])
def test_missing_logger_package_is_one_line_with_the_install_hint(
        logger, package, inputs, tmp_path, monkeypatch, capsys):
    import sys

    model, data = inputs
    monkeypatch.setitem(sys.modules, package, None)   # `import package` now fails
    assert main(["run", str(EXAMPLE), *args(model, data), "--run-dir", str(tmp_path / "r"),
                 "--logger", f"jsonl,{logger}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"graphrl: error: --logger {logger}: the {package} package is not installed (pip "
        f"install {package}, or pip install 'graphrl[loggers]')"]
    assert not (tmp_path / "r" / "config.json").exists()


def test_logger_option_errors(inputs, tmp_path, capsys):
    model, data = inputs
    assert main(["run", str(EXAMPLE), *args(model, data), "--logger", "tensorbord"]) == 2
    assert "unknown logger 'tensorbord' (did you mean 'tensorboard'?" in capsys.readouterr().err
    assert main(["run", str(EXAMPLE), *args(model, data), "--logger", "wandb"]) == 2
    assert "--logger wandb needs --run-dir DIR" in capsys.readouterr().err
    assert main(["run", "--quiet"]) == 2
    assert "name an EXAMPLE.py to run, or --config" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "nothing.json")]) == 2
    assert f"--config {tmp_path / 'nothing.json'}: no such file" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"iterations": 3}')
    assert main(["run", "--config", str(tmp_path / "other.json")]) == 2
    assert "not a graphrl run's config.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps(
        {"format": "graphrl-run/1", "options": {"iterations": "three"}}))
    assert main(["run", "--config", str(tmp_path / "bad.json")]) == 2
    assert "option iterations is 'three', expected int | None" in capsys.readouterr().err


def test_ctrl_c_finishes_the_wandb_run_failed_with_the_rows_so_far(inputs, tmp_path):
    from dataclasses import replace

    import graphrl as gr
    from word_problems import correct_answer

    model, data = inputs

    def reward(response, answer):
        return correct_answer(response, answer)

    exp = gr.recipes.text_grpo(str(model), str(data), reward, batch=4, group_size=4,
                               max_new_tokens=3)

    def batches(i):   # Ctrl-C as the second iteration starts (a KeyboardInterrupt raised
        if i == 1:    # inside the reward is the reward's error, graphrl.rewards)
            raise KeyboardInterrupt
        return exp.data(i)
    with pytest.raises(KeyboardInterrupt):
        gr.run(replace(exp, data=batches), iterations=3, quiet=True,
               run_dir=str(tmp_path / "r"), loggers=("jsonl", "wandb"))
    _, history, exit_code = wandb_records(tmp_path / "r")
    assert [h["_step"] for h in history] == [0] and exit_code == 1
    assert rows_of(tmp_path / "r" / "metrics.jsonl")[0]["reward_mean"] == \
        history[0]["reward_mean"]



def test_after_a_restart_jsonl_is_rewritten_and_tensorboard_keeps_the_redone_steps(tmp_path):
    """A Ray restart from a checkpoint redoes iterations: the loggers are rewound to the
    checkpoint's rows, then get the redone ones (graphrl.runner)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from graphrl.loggers import open_loggers

    log = open_loggers(("jsonl", "tensorboard"), metrics=str(tmp_path / "m.jsonl"),
                       run_dir=str(tmp_path), name="t", config={"options": {"seed": 0}})
    rows = [{"iteration": i, "reward_mean": 0.25 * i, "note": "text"} for i in range(3)]
    for row in rows:
        log.log_row(row)
    log.rewind(rows[:1])   # restarted from the checkpoint after iteration 0
    redone = [{"iteration": i, "reward_mean": 1.0 + i, "note": "text"} for i in (1, 2)]
    for row in redone:
        log.log_row(row)
    log.close()
    assert rows_of(tmp_path / "m.jsonl") == rows[:1] + redone
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["reward_mean"]   # the text value is not a scalar
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == \
        [(0, 0.0), (1, 2.0), (2, 3.0)]


def test_plan_summary_of_a_compiled_plan(inputs):
    """On Ray, config.json's plan is the compiled plan's cluster, policy, predicted step
    and each node's placement (as the plan prints them)."""
    from types import SimpleNamespace

    import graphrl as gr
    from graphrl.launch import compile_for
    from graphrl.run_record import plan_summary

    model, data = inputs
    opts = gr.RunOptions(backend="ray", cluster="1x4xcpu", batch_size=4,
                         model_dirs=(("policy", str(model)),), data=str(data))
    plan = compile_for(load_build("text_grpo")(opts).program(), opts).plan
    summary = plan_summary(SimpleNamespace(plan=plan), opts)
    assert summary["cluster"] == "1x4xcpu" and summary["policy"] == "auto"
    assert summary["predicted_step_seconds"] == plan.predicted_step_seconds
    placed = {n.name: n for n in plan.graph.nodes if n.placement is not None}
    assert set(summary["placement"]) == set(placed)
    for name, text in summary["placement"].items():
        assert text.endswith(placed[name].placement.text())
