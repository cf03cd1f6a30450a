"""--model DIR: a bare directory is the policy (and the reference starts as a copy of it,
where the example has one); ROLE=DIR stays for the other roles."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

import graphrl as gr
from conftest import load_build
from graphrl.cli.run_args import add_run_options, run_options
from graphrl.run_identity import architectures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from word_problems import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("m") / "my-model", seed=3, hidden=32,
                                layers=1))


def parse(*argv: str) -> gr.RunOptions:
    p = argparse.ArgumentParser()
    add_run_options(p)
    return run_options(p.parse_args(list(argv)))


def test_bare_dir_is_the_policy(model_dir, tmp_path):
    assert parse("--model", model_dir).model_dirs == (("policy", model_dir),)
    assert parse("--model", model_dir, "--model", "reward=./rm").model_dirs == \
        (("policy", model_dir), ("reward", "./rm"))
    odd = tmp_path / "run=3"   # an existing directory whose name has '='
    odd.mkdir()
    assert parse("--model", str(odd)).model_dirs == (("policy", str(odd)),)
    with pytest.raises(gr.UsageError, match="--model expects ROLE=DIR, got '=x'"):
        parse("--model", "=x")


@pytest.mark.parametrize("example", ["grpo", "ppo", "text_grpo"])
def test_examples_take_a_bare_model_dir(example, model_dir, tmp_path):
    """The policy and the reference are the directory's model; the other roles keep the
    example's own; the traced graph plans the directory's architecture for both."""
    opts = parse("--model", model_dir, "--run-dir", str(tmp_path), "--batch-size", "2")
    exp = load_build(example)(opts)
    models = {m.name: m for m in exp.models}
    assert models["policy"].config == model_dir and models["reference"].config == model_dir
    arch = architectures(exp.program().graph.text())
    assert arch["policy"] == arch["reference"]
    assert re.match(r"llama\{vocab=\d+, hidden=32, layers=1,", arch["policy"]), arch
    others = [m for m in models if m not in ("policy", "reference")]
    assert all(models[m].config != model_dir for m in others)


def test_reference_starts_as_the_policy_directory(model_dir, tmp_path):
    """Built on the local backend, the policy's weights are the directory's and the
    reference's are the same (in its bf16)."""
    import torch
    from safetensors.torch import load_file

    from graphrl.backends.local import LocalExecutor

    exp = load_build("grpo")(parse("--model", model_dir, "--batch-size", "2"))
    executor = LocalExecutor(exp.program())
    try:
        saved = load_file(f"{model_dir}/model.safetensors")
        policy = executor.engines["policy"].export_weights()
        reference = executor.engines["reference"].export_weights()
        assert sorted(policy) == sorted(reference)
        for name, t in policy.items():   # the reference frozen in bf16, the policy's fp32
            assert torch.equal(t, saved[name]), name
            assert torch.equal(reference[name], t.to(reference[name].dtype)), name
    finally:
        executor.close()


@pytest.mark.parametrize("example", ["grpo", "ppo"])
def test_synthetic_examples_run_on_a_model_dir(example, model_dir):
    """The synthetic task and the tiny reward model and critic take the directory's
    vocabulary (the word-level tokenizer's, not the task's default 16), so every model
    reads the token ids the policy generates: one iteration runs."""
    import dataclasses
    import io

    from graphrl.runner import run_experiment

    opts = parse("--model", model_dir, "--batch-size", "2", "--iterations", "1", "--quiet")
    exp = dataclasses.replace(load_build(example)(opts), prepare=None)
    vocab = {re.match(r"\w+\{vocab=(\d+)", a).group(1)
             for a in architectures(exp.program().graph.text()).values()}
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert vocab == {str(config["vocab_size"])} and config["vocab_size"] != 16
    summary = run_experiment(exp, opts, out=io.StringIO())
    assert len(summary.rows) == 1 and 0 <= summary.rows[0]["reward_mean"] <= 1
