"""The local backend: runs a traced step, checks payloads, names failing nodes, records a
Chrome-trace timeline, frees dead values, and carries new weights into the next step."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import graphrl as gr
from conftest import load_build
from graphrl.backends.local import LocalExecutor
from graphrl.runner import run_experiment
from graphrl.timeline import read_chrome_trace


@pytest.fixture(scope="module")
def ppo():
    return load_build("ppo")(gr.RunOptions(batch_size=4))


def test_step_outputs_match_declared_payloads(ppo):
    program = ppo.program()
    ex = LocalExecutor(program, seed=0)
    result = ex.run_step(ppo.data(0), iteration=0)
    assert set(result.outputs) == {"task_score", "rm_score", "policy_stats", "critic_stats"}
    assert result.outputs["task_score"]["score"].shape == (4,)
    assert [e.call for e in result.events] == [n.call for n in program.graph.nodes]
    assert all(e.end >= e.start for e in result.events)
    # train bumped the versions; the next step reads the new weights
    assert ex.engines["policy"].version == 1 and ex.engines["critic"].version == 1
    assert ex.carried["%policy@0"].version == 1 and ex.carried["%reference@0"].version == 0
    ex.run_step(ppo.data(1), iteration=1)
    assert ex.engines["policy"].version == 2


def test_policy_weights_change_and_reference_starts_as_policy(ppo):
    ex = LocalExecutor(ppo.program(), seed=0)
    before = ex.engines["policy"].export_weights()
    ref = ex.engines["reference"].export_weights()
    # the frozen reference holds the policy's initial weights in its precision (bf16)
    assert {v.dtype for v in ref.values()} == {torch.bfloat16}
    assert all(torch.equal(before[k].to(ref[k].dtype), ref[k]) for k in before)
    ex.run_step(ppo.data(0))
    after = ex.engines["policy"].export_weights()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ref[k], ex.engines["reference"].export_weights()[k]) for k in ref)


def test_same_seed_same_results(ppo):
    a = LocalExecutor(ppo.program(), seed=3).run_step(ppo.data(0))
    b = LocalExecutor(ppo.program(), seed=3).run_step(ppo.data(0))
    for name, payload in a.outputs.items():
        for field, t in payload.items():
            assert torch.equal(t, b.outputs[name][field]), (name, field)


def test_dead_values_are_freed(ppo):
    g = ppo.program().graph
    dead = g.last_uses()
    freed = {v for vs in dead.values() for v in vs}
    assert "%rollout" in freed and "%advantages" in freed
    assert not freed & set(g.outputs)


def test_failing_op_is_named(ppo):
    program = ppo.program()

    def broken(rollout, scores, values, lp, ref_lp, **kw):
        raise RuntimeError("boom")

    ops = dict(program.ops, gae=dataclasses.replace(program.ops["gae"], fn=broken))
    ex = LocalExecutor(dataclasses.replace(program, ops=ops), seed=0)
    with pytest.raises(gr.ExecutionError, match=r"node %advantages \(gae\) failed at "
                                                r"iteration 0: RuntimeError: boom"):
        ex.run_step(ppo.data(0))


def test_wrong_payload_from_an_op_is_caught(ppo):
    program = ppo.program()
    bad = dataclasses.replace(program.ops["task_score"],
                              fn=lambda rollout: {"score": torch.zeros(3)})
    ex = LocalExecutor(dataclasses.replace(program, ops=dict(program.ops, task_score=bad)))
    with pytest.raises(gr.ExecutionError, match=r"task_score.*shape \(3,\)"):
        ex.run_step(ppo.data(0))


def test_missing_input_is_named(ppo):
    ex = LocalExecutor(ppo.program())
    with pytest.raises(gr.ExecutionError, match="input 'prompts' was not given"):
        ex.run_step({})


def test_metrics_and_chrome_trace(ppo, tmp_path):
    opts = gr.RunOptions(iterations=2, seed=0, batch_size=4, quiet=True,
                         metrics=str(tmp_path / "m.jsonl"), trace=str(tmp_path / "t.json"))
    # without the example's reward-model training (tests/test_examples_learn.py runs it)
    run_experiment(dataclasses.replace(load_build("ppo")(opts), prepare=None), opts)
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert {"reward_mean", "step_seconds", "seconds/policy.generate",
            "policy_stats/loss", "critic_stats/loss"} <= set(rows[0])
    trace = json.loads((tmp_path / "t.json").read_text())
    assert trace["otherData"]["source"] == "measured"
    events = trace["traceEvents"]
    assert len(events) == 2 * len(ppo.program().graph.nodes)
    assert all(e["ph"] == "X" and e["dur"] >= 0 for e in events)
    assert {e["name"] for e in events} >= {"policy.generate", "critic.train", "gae"}
    back = read_chrome_trace(tmp_path / "t.json")
    assert {e.iteration for e in back} == {0, 1}
