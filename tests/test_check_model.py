"""`graphrl check-model DIR`: every engine against Hugging Face's own module on the tiny
random checkpoints of graphrl.families; exit 1 on a mismatch, 2 on bad input; an engine
lacking a feature of the checkpoint is refused with the feature named."""
from __future__ import annotations

import json
import shutil

import pytest

from graphrl.architecture import FEATURES, architecture, missing_features
from graphrl.backends.conformance import TOLERANCES
from graphrl.cli import main
from graphrl.families import TINY, save_random_checkpoint

FIELDS = {"engine", "strategy", "precision", "status", "max_logprob_diff", "max_step_diff",
          "reason"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    """family -> a random checkpoint directory of its tiny config (built once)."""
    root = tmp_path_factory.mktemp("families")
    return {f: save_random_checkpoint(TINY[f], root / f) for f in TINY}


def check(capsys, *argv: str) -> tuple[int, list]:
    code = main(["check-model", *argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if code in (0, 1) else out


def derived(src, dst, **changes) -> str:
    """A copy of checkpoint `src` whose config.json has `changes` (None deletes)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def assert_truthful(rows: list, config: dict, precision: str) -> None:
    """Each row: ok within the tolerances, or refused; a feature the engine lacks is a
    refusal that names it."""
    arch = architecture(config)
    for r in rows:
        assert FIELDS <= set(r)
        lacking = missing_features(r["engine"], arch)
        if lacking:
            assert r["status"] == "refused", r
            assert all(FEATURES[f] in r["reason"] for f in lacking), r
        assert r["status"] in ("ok", "refused"), r
        if r["status"] == "ok":
            assert r["precision"] == precision or "ran" in r["reason"]
            assert r["max_logprob_diff"] <= TOLERANCES[r["precision"]].logprob
            assert r["max_step_diff"] <= TOLERANCES[r["precision"]].step
        else:
            assert f"engine {r['engine']}" in r["reason"] or "graphrl" in r["reason"], r


@pytest.mark.parametrize("family", list(TINY))
def test_hf_and_fast_match_hf_module(family, checkpoints, capsys):
    code, rows = check(capsys, str(checkpoints[family]), "--engine", "hf",
                       "--engine", "fast", "--precision", "fp32")
    assert code == 0
    assert [(r["engine"], r["strategy"]) for r in rows] == [("hf", "dp=1"), ("fast", "dp=1")]
    assert_truthful(rows, TINY[family], "fp32")
    fast = rows[1]
    if fast["status"] == "ok":   # its greedy tokens are HF's
        done, total = map(int, fast["greedy"].split("/"))
        assert done == total


def test_bf16_is_the_default_and_runs_in_bf16(checkpoints, capsys):
    code, rows = check(capsys, str(checkpoints["llama2"]), "--engine", "hf")
    assert code == 0
    (r,) = rows
    assert (r["status"], r["precision"]) == ("ok", "bf16")
    # bf16 rounding shows (HF's module is the fp32 reference) and stays within the bound
    assert 0 < r["max_logprob_diff"] <= TOLERANCES["bf16"].logprob


def test_an_engine_running_another_precision_is_a_mismatch(checkpoints, capsys,
                                                          monkeypatch):
    from graphrl.backends.engines.hf import HFEngine

    monkeypatch.setattr(HFEngine, "ran_precision", lambda self: "fp32")
    code, rows = check(capsys, str(checkpoints["llama2"]), "--engine", "hf")
    assert code == 1
    assert rows[0]["status"] == "mismatch"
    assert "asked bf16, the engine ran fp32" in rows[0]["reason"]


def test_text_lines(checkpoints, capsys):
    assert main(["check-model", str(checkpoints["gpt2"]), "--engine", "hf",
                 "--precision", "fp32"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("✓ hf dp=1  fp32  max |Δ logprob| ")


def test_a_perturbed_engine_is_a_mismatch(checkpoints, capsys, monkeypatch):
    from graphrl.backends.engines.fast import FastEngine

    real = FastEngine.forward

    def off(self, rollout):
        out = real(self, rollout)
        return {"logprobs": out["logprobs"] + 1e-3}

    monkeypatch.setattr(FastEngine, "forward", off)
    code, rows = check(capsys, str(checkpoints["llama2"]), "--engine", "hf,fast",
                       "--precision", "fp32")
    assert code == 1
    assert [r["status"] for r in rows] == ["ok", "mismatch"]
    assert "log-prob" in rows[1]["reason"] and rows[1]["max_logprob_diff"] > 9e-4


def test_an_engine_usage_error_is_a_refusal(checkpoints, capsys, monkeypatch):
    from graphrl.backends.engines import registry
    from graphrl.errors import UsageError

    def refuse(engine, decl, *args):
        raise UsageError(f"model {decl.name}: engine {engine} cannot do this")

    monkeypatch.setattr(registry, "create_engine", refuse)
    code, rows = check(capsys, str(checkpoints["gpt2"]), "--engine", "fast")
    assert code == 0 and rows[0]["status"] == "refused"
    assert "cannot do this" in rows[0]["reason"]


@pytest.mark.parametrize("family,changes,word", [
    ("mistral", {"sliding_window": 4}, "sliding_window=4"),
    ("llama2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                    "factor": 4.0, "original_max_position_embeddings": 32}},
     "yarn"),
])
def test_a_feature_an_engine_lacks_is_refused_by_name(family, changes, word, checkpoints,
                                                      tmp_path, capsys):
    d = derived(checkpoints[family], tmp_path / "m", **changes)
    config = {**TINY[family], **changes}
    lacking = [e for e in ("hf", "fast", "megatron", "deepspeed")
               if missing_features(e, architecture(config))]
    if not lacking:
        pytest.skip("every engine implements it now")
    code, rows = check(capsys, d, "--engine", ",".join(lacking))
    assert code == 0
    assert {r["status"] for r in rows} == {"refused"}
    assert all(word in r["reason"] and f"engine {r['engine']}" in r["reason"] for r in rows)


def test_bad_input_exits_2(checkpoints, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["check-model", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(checkpoints["llama2"] / "model.safetensors", bare)
    assert main(["check-model", str(bare)]) == 2
    assert "no config.json" in capsys.readouterr().err
    odd = derived(checkpoints["llama2"], tmp_path / "odd", frobnicate_heads=3)
    assert main(["check-model", odd]) == 2
    assert "frobnicate_heads" in capsys.readouterr().err
    assert main(["check-model", str(checkpoints["llama2"]), "--engine", "vllm"]) == 2
    assert "vllm" in capsys.readouterr().err


def test_multi_rank_engines_match(checkpoints, capsys):
    """megatron tp=2 and DeepSpeed ZeRO-3 dp=2 on spawned gloo ranks (one spawn)."""
    code, rows = check(capsys, str(checkpoints["llama2"]), "--engine", "megatron",
                       "--tp", "2", "--engine", "deepspeed", "--precision", "fp32")
    assert code == 0
    assert [(r["engine"], r["strategy"]) for r in rows] == [
        ("megatron", "tp=2"), ("deepspeed", "zero=3 dp=2")]
    assert_truthful(rows, TINY["llama2"], "fp32")
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_a_crashed_or_hung_rank_is_named():
    from spawn_failing import failing_rank

    from graphrl.backends.engines.spawn import spawn
    from graphrl.errors import ExecutionError

    from graphrl.backends.engines.spawn import ENGINE_MODULES

    for preload in ((), ENGINE_MODULES):   # fresh interpreters; forked from the fork server
        with pytest.raises(ExecutionError,
                           match="megatron tp=2: a rank failed: .*boom on rank 1"):
            spawn(failing_rank, (0.0,), 2, 60, "megatron tp=2", preload=preload)
        with pytest.raises(ExecutionError,
                           match="deepspeed zero=3 dp=2: .* did not finish in 2 s"):
            spawn(failing_rank, (60.0,), 1, 2, "deepspeed zero=3 dp=2", preload=preload)
