"""Evaluation during training (graphrl/evaluation.py): pass@k against its formula, the
eval step in the graph and the plan, every-N-th-step rows, training untouched by it, a
text run with --eval-data read back, plot curves, bad input."""
from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest
import torch

import graphrl as gr
from graphrl.cli import main
from graphrl.evaluation import EVAL_EVERY, EvalOptions, eval_metrics, pass_at_k
from word_problems import write_held_out, write_problems, write_tiny_llama

from conftest import EXAMPLES, load_build


# -- pass@k -----------------------------------------------------------------------------
def paper_pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021, Fig. 3: the numerically stable product form of eq. 1."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (5, 2, 4), (10, 0, 3), (10, 10, 1),
                                   (8, 1, 8), (20, 3, 5), (1, 1, 1)])
def test_pass_at_k_is_eq1(n, c, k):
    expected = 1.0 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(paper_pass_at_k(n, c, k), abs=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(n, c, n + 1)


def test_eval_metrics_on_hand_made_scores():
    # 3 prompts x 4 samples; correct (>= 0.5): 2, 0 and 4 of 4
    scores = torch.tensor([1, 0.7, 0.2, 0, 0, 0.4, 0.1, 0.49, 1, 1, 0.5, 0.9])
    mask = torch.zeros(12, 6)
    mask[:, 2:5] = 1.0   # 3 response tokens each
    mask[0, 4] = 0.0     # one of 2
    greedy = torch.tensor([1.0, 0.0, 0.6])
    out = {"eval_scores": {"score": scores}, "eval_rollout": {"response_mask": mask},
           "eval_greedy_scores": {"score": greedy}}
    row = eval_metrics(out, EvalOptions(every=1, samples=4, greedy=True, threshold=0.5))
    # pass@1 = mean of c/n; pass@4 = share of prompts with any correct sample
    assert row["eval/pass@1"] == pytest.approx((2 / 4 + 0 + 4 / 4) / 3)
    assert row["eval/pass@4"] == pytest.approx(2 / 3)
    assert row["eval/reward_mean"] == pytest.approx(float(scores.mean()))
    assert row["eval/response_length_mean"] == pytest.approx(35 / 12)
    assert row["eval/greedy_pass@1"] == pytest.approx(2 / 3)
    assert row["eval/greedy_reward_mean"] == pytest.approx(float(greedy.mean()))
    assert row["eval/prompts"] == 3


# -- the eval step in the graph and the plan ----------------------------------------------
def grpo(example="grpo", **eval_opts):
    return load_build(example)(gr.RunOptions(batch_size=4, **eval_opts))


@pytest.mark.parametrize("example", ["grpo", "ppo"])
def test_eval_step_is_in_the_graph_and_the_plan(example):
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph
    from graphrl.evaluation import describe

    graph = grpo(example, eval_every=3, eval_samples=2, eval_greedy=True).program().graph
    evals = [n for n in graph.nodes if n.attr(EVAL_EVERY) == 3]
    assert [n.call for n in evals] == ["policy.generate", "task_score"] * 2
    train = graph.node("%policy@1")
    assert all(graph.nodes.index(n) > graph.nodes.index(train) for n in evals)
    gens = [n for n in evals if n.target == "generate"]
    assert [n.inputs for n in gens] == [("%policy@1", "%eval_prompts")] * 2
    assert [(n.attr("samples"), n.attr("temperature")) for n in gens] == [(2, 1.0), (1, 0.0)]
    assert gr.parse_graph(graph.text()) == graph
    plain = grpo(example).program().graph   # the training part: the step without eval
    assert [n for n in graph.nodes if n.attr(EVAL_EVERY) is None] == list(plain.nodes)

    plan = compile_graph(graph, ClusterSpec.parse("1x4xcpu"), "auto").plan
    ran = {i.node for _, i in plan.instrs() if i.op == "run"}
    assert {"%eval_rollout", "%eval_greedy_rollout", "%eval_scores"} <= ran
    lines = describe(plan.graph)
    assert lines[0].startswith("evaluation every 3 training steps (iterations 2, 5, ...)")
    assert any(ln.strip().startswith("%eval_rollout @[") for ln in lines)


# -- executing it ----------------------------------------------------------------------------
def run_local(exp, steps):
    from graphrl.backends.local import LocalExecutor

    ex = LocalExecutor(exp.program(), seed=3)
    return [ex.run_step(exp.step_inputs(i), iteration=i).outputs for i in range(steps)]


def test_eval_every_n_steps_leaves_training_unchanged():
    plain = run_local(grpo(), 2)
    with_eval = run_local(grpo(eval_every=2, eval_samples=2), 2)
    for a, b in zip(plain, with_eval):
        for name in ("task_score", "rm_score", "policy_stats"):
            for f in a[name]:
                assert torch.equal(a[name][f], b[name][f]), (name, f)
    assert ["eval_scores" in o for o in with_eval] == [False, True]
    scores = with_eval[1]["eval_scores"]["score"]
    assert scores.shape == (2 * 32,) and 0 <= float(scores.min()) <= float(scores.max()) <= 1
    # the held-out prompts are not a training batch
    held_out = grpo(eval_every=2).evaluation.prompts["tokens"]
    assert not any(torch.equal(held_out[:4], grpo().data(i)["prompts"]["tokens"])
                   for i in range(100))


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaltext")
    model = write_tiny_llama(d / "tiny", seed=0)
    train = write_problems(d / "train.jsonl", n=32, seed=1)
    held = write_problems(d / "test.jsonl", n=6, seed=2)
    return d, model, train, held


def test_text_run_writes_eval_rows(text_files, tmp_path, capsys):
    """The eval rows of a text GRPO run, read back from its metrics file and from the
    TensorBoard logger's event files."""
    d, model, train, held = text_files
    run_dir = tmp_path / "run"
    rc = main(["run", str(EXAMPLES / "text_grpo.py"), "--model", f"policy={model}",
               "--data", str(train), "--eval-data", str(held), "--eval-every", "2",
               "--eval-samples", "3", "--eval-greedy", "--iterations", "4", "--batch-size",
               "2", "--run-dir", str(run_dir), "--logger", "jsonl,tensorboard", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert ["eval/pass@3" in r for r in rows] == [False, True, False, True]
    for r in (rows[1], rows[3]):
        assert r["eval/prompts"] == 6
        # 0/1 rewards: pass@1 (mean c/n) is the mean reward; pass@3 >= pass@1
        assert r["eval/pass@1"] == pytest.approx(r["eval/reward_mean"])
        assert r["eval/pass@3"] >= r["eval/pass@1"] - 1e-9
        assert r["eval/greedy_pass@1"] == pytest.approx(r["eval/greedy_reward_mean"])
        assert 1 <= r["eval/response_length_mean"] <= 4
        assert "reward_mean" in r and "eval_rollout" not in json.dumps(r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("eval/pass@1", "eval/pass@3", "eval/greedy_pass@1", "eval/reward_mean"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(1, float(np.float32(rows[1][key]))),
                       (3, float(np.float32(rows[3][key])))], key


def test_a_resumed_run_keeps_evaluating(text_files, tmp_path, capsys):
    d, model, train, held = text_files
    common = ["run", str(EXAMPLES / "text_grpo.py"), "--model", f"policy={model}", "--data",
              str(train), "--eval-data", str(held), "--eval-every", "2", "--batch-size", "2",
              "--quiet", "--metrics", str(tmp_path / "m.jsonl")]
    ckpt = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "2"]
    assert main(common + ckpt + ["--iterations", "4"]) == 0, capsys.readouterr().err
    halfway = str(tmp_path / "ck" / "ckpt-00000002")
    assert main(common + ["--resume", halfway, "--iterations", "4"]) == 0, \
        capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["iteration"], "eval/pass@1" in r) for r in rows] == \
        [(0, False), (1, True), (2, False), (3, True)]
    line = error_line(capsys, common[:-2] + ["--resume", halfway, "--iterations", "4",
                                             "--eval-every", "3"])
    assert "--eval-every: checkpoint 2, this run 3" in line


def test_held_out_word_problems_are_not_training_prompts(tmp_path):
    train = write_problems(tmp_path / "train.jsonl", n=500, seed=0)
    held = write_held_out(tmp_path / "held.jsonl", train, n=16)
    prompts = lambda f: [json.loads(x)["prompt"] for x in f.read_text().splitlines()]  # noqa: E731
    assert len(set(prompts(held))) == 16 and not set(prompts(held)) & set(prompts(train))


def test_plot_draws_eval_curves(tmp_path):
    from graphrl.plot import panels, plot_metrics

    rows = [{"iteration": i, "reward_mean": 0.1 * i} for i in range(4)]
    for r in rows[1::2]:
        r |= {"eval/reward_mean": 0.3, "eval/pass@1": 0.2, "eval/pass@4": 0.5}
    file = tmp_path / "m.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = panels(rows)
    assert drawn["held-out evaluation"] == ["eval/pass@1", "eval/pass@4", "eval/reward_mean"]
    assert plot_metrics(str(file)).stat().st_size > 0


# -- bad input ---------------------------------------------------------------------------------
def error_line(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("graphrl: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_eval_options(tmp_path, capsys, text_files):
    d, model, train, held = text_files
    grpo_py = str(EXAMPLES / "grpo.py")
    assert "--eval-every" in error_line(capsys, ["show", grpo_py, "--eval-every", "0"])
    assert "--eval-every" in error_line(capsys, ["show", grpo_py, "--eval-every", "-2"])
    assert "--eval-samples" in error_line(capsys, ["show", grpo_py, "--eval-every", "1",
                                                   "--eval-samples", "0"])
    assert "needs --eval-every" in error_line(capsys, ["show", grpo_py, "--eval-samples", "4"])
    assert "synthetic task" in error_line(capsys, ["show", grpo_py, "--eval-every", "1",
                                                   "--eval-data", str(held)])
    text = ["show", str(EXAMPLES / "text_grpo.py"), "--model", f"policy={model}", "--data",
            str(train), "--eval-every", "1"]
    assert "--eval-data FILE" in error_line(capsys, text)
    missing = error_line(capsys, text + ["--eval-data", str(tmp_path / "none.jsonl")])
    assert "--eval-data" in missing and "no such file" in missing
    (tmp_path / "empty.jsonl").write_text("")
    assert "no rows" in error_line(capsys, text + ["--eval-data", str(tmp_path / "empty.jsonl")])
    (tmp_path / "q.jsonl").write_text('{"question": "2 + 2 ?", "answer": "4"}\n')
    line = error_line(capsys, text + ["--eval-data", str(tmp_path / "q.jsonl")])
    assert "q.jsonl line 1" in line and "no field 'prompt'" in line
    with pytest.raises(gr.UsageError, match="--eval-every 0"):
        EvalOptions(every=0)
    reward = lambda response, answer: 0.0  # noqa: E731
    plain = gr.recipes.text_grpo(str(model), str(train), reward, batch=2, group_size=2)
    with pytest.raises(gr.UsageError, match="does not evaluate"):
        gr.run(plain, eval_every=1, quiet=True)
    with pytest.raises(gr.UsageError, match="needs evaluation="):
        gr.recipes.text_grpo(str(model), str(train), reward, eval_data=str(held))
    with pytest.raises(gr.UsageError, match="--staleness"):
        grpo(eval_every=1, staleness=1)
