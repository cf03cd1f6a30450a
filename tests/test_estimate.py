"""`graphrl estimate`: the cost model on the command line."""
from __future__ import annotations

import json

import pytest

from graphrl import cost
from graphrl.cluster import GiB, H100_80G
from graphrl.cli.estimate import main
from graphrl.parallel import Strategy
from graphrl.types import ModelSpec, llama2


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(llama2("7b").hf_config_dict()))
    return str(path)


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_json_matches_the_cost_model(capsys, config):
    out = run_json(capsys, ["--model-config", config, "--phase", "train", "--batch", "8",
                            "--seq", "1024", "--gpu", "H100-80G", "--dp", "8", "--zero", "3"])
    expected = cost.estimate(ModelSpec.from_hf_config(llama2("7b").hf_config_dict()), "train",
                             8, 1024, Strategy(dp=8, zero=3), H100_80G)
    assert out["seconds"] == pytest.approx(expected.seconds)
    assert out["peak_memory_bytes"] == expected.peak_memory_bytes
    assert out["peak_memory_gib"] == pytest.approx(expected.peak_memory_bytes / GiB)
    assert out["strategy"] == "dp=8,tp=1,pp=1,zero=3"
    assert out["gpu"] == "H100-80G" and out["fits"] is True
    assert out["num_params"] == llama2("7b").num_params


def test_generate_engines(capsys, config):
    base = ["--model-config", config, "--phase", "generate", "--batch", "8", "--seq", "128",
            "--new-tokens", "128", "--gpu", "h100"]
    hf = run_json(capsys, base + ["--engine", "hf"])
    graph = run_json(capsys, base + ["--engine", "graph"])
    assert graph["seconds"] * 2.5 < hf["seconds"]
    assert graph["engine"] == "graph" and graph["new_tokens"] == 128
    assert hf["peak_memory_bytes"] == graph["peak_memory_bytes"]


def test_parallel_flags_split_memory(capsys, config):
    base = ["--model-config", config, "--phase", "forward", "--batch", "16", "--seq", "512"]
    one = run_json(capsys, base)
    tp = run_json(capsys, base + ["--tp", "4", "--pp", "2", "--micro-batches", "4"])
    assert tp["peak_memory_bytes"] < one["peak_memory_bytes"]
    assert tp["strategy"] == "dp=1,tp=4,pp=2,mb=4"


def test_seventy_b_on_one_gpu_does_not_fit(capsys, tmp_path):
    path = tmp_path / "70b.json"
    path.write_text(json.dumps(llama2("70b").hf_config_dict()))
    out = run_json(capsys, ["--model-config", str(path), "--phase", "train", "--batch", "1",
                            "--seq", "1024"])
    assert out["fits"] is False and out["peak_memory_gib"] > 80


def test_human_table(capsys, config):
    assert main(["--model-config", config, "--phase", "train", "--batch", "4", "--seq",
                 "512", "--gpu", "A100"]) == 0
    out = capsys.readouterr().out
    assert "time" in out and "GiB per GPU" in out and "A100-80G" in out


def test_gpt2_config_and_value_head(capsys, tmp_path):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768,
                                "n_layer": 12, "n_head": 12, "n_positions": 1024}))
    out = run_json(capsys, ["--model-config", str(path), "--phase", "forward", "--batch", "4",
                            "--seq", "256", "--head", "value", "--gpu", "cpu"])
    assert out["seconds"] > 0 and out["gpu"] == "cpu"


@pytest.mark.parametrize("argv", [
    [],                                                           # required flags missing
    ["--phase", "train", "--batch", "1", "--seq", "8"],           # no --model-config
    ["--model-config", "C", "--phase", "decode", "--batch", "1", "--seq", "8"],
    ["--model-config", "C", "--phase", "train", "--batch", "0", "--seq", "8"],
    ["--model-config", "C", "--phase", "train", "--batch", "x", "--seq", "8"],
    ["--model-config", "C", "--phase", "train", "--batch", "1", "--seq", "8", "--gpu", "V100"],
    ["--model-config", "C", "--phase", "train", "--batch", "1", "--seq", "8", "--zero", "4"],
    ["--model-config", "C", "--phase", "train", "--batch", "1", "--seq", "8", "--tp", "-2"],
    ["--model-config", "C", "--phase", "generate", "--batch", "1", "--seq", "8"],
    ["--model-config", "C", "--phase", "train", "--batch", "1", "--seq", "8",
     "--new-tokens", "4"],
    ["--model-config", "C", "--phase", "generate", "--batch", "1", "--seq", "8",
     "--new-tokens", "4", "--engine", "vllm"],
])
def test_bad_arguments_are_usage_errors(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: graphrl estimate")


def test_missing_config_file_is_one_line_error(capsys, tmp_path):
    code = main(["--model-config", str(tmp_path / "nope.json"), "--phase", "train",
                 "--batch", "1", "--seq", "8"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("graphrl: error:")
    assert "nope.json" in err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"model_type": "llama"}',
                                     '{"model_type": "bert", "vocab_size": 3}'])
def test_bad_config_is_one_line_error(capsys, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["--model-config", str(path), "--phase", "forward", "--batch", "1",
                 "--seq", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("graphrl: error:")
