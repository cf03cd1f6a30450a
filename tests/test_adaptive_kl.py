"""Adaptive KL control (grpo's kl_control="adaptive"): the coefficient is state of the
trained model's engine, updated once per train call by Ziegler et al. 2019, §2.2
(e = clip(KL / target - 1, -0.2, 0.2), beta <- beta (1 + K_beta e)), reported as the
train stat `kl_coef`, and restored with the engine's checkpoint state."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import graphrl as gr
from conftest import ROOT
from graphrl.errors import TraceError
from graphrl.runner import run_experiment

sys.path.insert(0, str(ROOT / "examples"))

GROUP = 2
KL = dict(kl_coef=0.05, kl_control="adaptive", kl_target=0.065, kl_gain=0.5)


def ziegler(beta, kl, target, gain):
    """Ziegler et al. 2019, §2.2, written out here (not graphrl's function)."""
    e = kl / target - 1.0
    e = -0.2 if e < -0.2 else (0.2 if e > 0.2 else e)
    return beta * (1.0 + gain * e)


def experiment(opts, **train):
    from common import policy_and_reference, prompt_data, task_for

    task = task_for(opts)

    from graphrl.signatures import ROLLOUT, SCORES

    @gr.ops.op("score", (ROLLOUT,), (("score", SCORES, (
        gr.Field("score", "f32", per_token=False),)),))
    def score(rollout):
        return {"score": task.score(rollout["tokens"]).float()}

    def step(prompts, policy, reference):
        rollout = policy.generate(prompts, max_new_tokens=task.response_len,
                                  temperature=1.0, samples=GROUP)
        old = policy.forward(rollout)
        ref = reference.forward(rollout)
        scores = score(rollout)
        adv = gr.ops.group_advantages(rollout, scores, group_size=GROUP)
        stats = policy.train(loss="grpo", rollout=rollout, old_logprobs=old,
                             ref_logprobs=ref, advantages=adv, epochs=2, minibatches=2,
                             **train)
        return {"task_score": scores, "policy_stats": stats}

    return gr.Experiment(name="adaptive_kl_step", step=step,
                         models=policy_and_reference(opts),
                         inputs={"prompts": gr.prompts_spec(2, task.prompt_len)},
                         data=prompt_data(task, 2, opts.seed), reward="task_score",
                         iterations=3)


def rows(run=None, **train):
    torch.set_num_threads(1)
    opts = gr.RunOptions(batch_size=2, quiet=True, seed=0, **(run or {}))
    with open(os.devnull, "w") as out:
        return run_experiment(experiment(opts, **train), opts, out=out).rows


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory):
    """Three iterations with kl_control="adaptive", a checkpoint after each."""
    folder = tmp_path_factory.mktemp("ckpt")
    return rows({"checkpoint_dir": str(folder), "checkpoint_every": 1, "keep": 3},
                **KL), folder


def stat(row, name):
    keys = [k for k in row if k.endswith(name) and "policy" in k]
    assert len(keys) == 1, sorted(row)
    return row[keys[0]]


def test_coefficient_follows_ziegler_over_three_train_calls(adaptive):
    got, _ = adaptive
    coefs, kls = [stat(r, "/kl_coef") for r in got], [stat(r, "/kl") for r in got]
    # the stats travel as float32 tensors (backends/local.py): compare to 1e-6
    assert len(coefs) == 3 and coefs[0] == pytest.approx(KL["kl_coef"], rel=1e-7)
    for t in range(2):
        want = ziegler(coefs[t], kls[t], KL["kl_target"], KL["kl_gain"])
        assert coefs[t + 1] == pytest.approx(want, rel=1e-6, abs=0)
        # inside the clip here: the proportional part of the controller is exercised
        assert abs(kls[t] / KL["kl_target"] - 1) < 0.2, kls
    assert coefs[1] != coefs[0] and coefs[2] != coefs[1]
    assert any(kl > 0 for kl in kls)


def test_resume_goes_on_from_the_saved_coefficient(adaptive):
    """A run resumed after iteration 1 reports the uninterrupted run's rows, its
    coefficients included (the engine's checkpoint state holds the coefficient)."""
    got, folder = adaptive
    resumed = rows({"resume": str(folder / "ckpt-00000001")}, **KL)

    def same(rs):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]
    assert same(resumed) == same(got)
    assert stat(resumed[2], "/kl_coef") != KL["kl_coef"]


def test_fixed_coefficient_stays():
    got = rows(kl_coef=0.05)
    assert [stat(r, "/kl_coef") for r in got] == [pytest.approx(0.05, rel=1e-7)] * 3


def test_engine_checkpoint_state_restores_the_coefficient():
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.builtin_losses import grpo

    decl = gr.ModelDecl("m", gr.ModelSpec("llama", 16, 32, 1, 2, 2, 64, 32, "lm",
                                          dtype="fp32"), "policy", True)
    eng = HFEngine(decl, {}, seed=0)
    eng.kl_control.options(grpo, KL)
    eng.kl_control.update("m", grpo, KL, {"kl": 1.0})
    state = eng.state_dict()
    assert state["kl_coef"] == pytest.approx(KL["kl_coef"] * 1.1)
    fresh = HFEngine(decl, {}, seed=1)
    fresh.load_state_dict(state)
    assert fresh.kl_control.coef == state["kl_coef"]
    assert fresh.kl_control.options(grpo, KL)["kl_coef"] == state["kl_coef"]


def _trace(**kw):
    from graphrl.ops import ADV_FIELDS
    from graphrl.signatures import ADVANTAGES, ROLLOUT, prompts_spec
    from graphrl.trace import Model, trace
    from graphrl.types import llama2

    advantage = gr.ops.op("adv", (ROLLOUT,), (("advantages", ADVANTAGES, ADV_FIELDS),))(
        lambda r: {"advantages": r["response_mask"]})

    def step(policy, reference, prompts):
        r = policy.generate(prompts, max_new_tokens=4)
        return {"s": policy.train(loss="grpo", rollout=r, ref_logprobs=reference.forward(r),
                                  advantages=advantage(r), **kw)}
    return trace(step, [Model("policy", llama2("7b"), "policy", trainable=True),
                        Model("reference", llama2("7b"), "reference")],
                 prompts=prompts_spec(2, 8))


@pytest.mark.parametrize("kwargs, needle", [
    ({"kl_control": "adaptive", "kl_target": 0.0}, "kl_target=0.0 must be > 0"),
    ({"kl_control": "adaptive", "kl_gain": 1.5}, "kl_gain=1.5 must be in (0, 1]"),
    ({"kl_control": "adaptive", "kl_gain": 0.0}, "kl_gain=0.0 must be in (0, 1]"),
    ({"kl_control": "adaptive", "kl_coef": 0.0}, "needs a KL term"),
    ({"kl_control": "pid"}, "kl_control='pid' (known: fixed, adaptive)"),
])
def test_bad_adaptive_options_are_one_trace_error(kwargs, needle):
    with pytest.raises(TraceError) as e:
        _trace(**kwargs)
    assert "policy.train" in str(e.value) and needle in str(e.value), str(e.value)


def test_engines_without_a_coefficient_refuse_adaptive():
    from graphrl.backends.engines.train_loop import train_epochs

    with pytest.raises(gr.UsageError, match="kl_control='adaptive' is not supported"):
        train_epochs("m", {"rollout": {"tokens": torch.zeros(2, 3)}}, loss="grpo", seed=0,
                     epochs=1, minibatches=1, step=lambda fn, idx: {}, options=KL)


def engine_coefficients(cls):
    """Three adaptive grpo train calls on a tiny model of engine class `cls`: the
    coefficients and KLs they report (float64 stats, straight from the engine)."""
    decl = gr.ModelDecl("m", gr.ModelSpec("llama", 16, 32, 1, 2, 2, 64, 32, "lm",
                                          dtype="fp32"), "policy", True)
    eng = cls(decl, {"lr": 5e-2}, seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (4, 8), generator=gen)
    mask = torch.zeros(4, 8)
    mask[:, 3:] = 1
    rollout = {"tokens": tokens, "attention_mask": torch.ones(4, 8), "response_mask": mask}
    ref = eng.forward(rollout)["logprobs"]
    adv = {"advantages": torch.randn(4, 8, generator=gen) * mask}
    out = []
    for i in range(3):
        stats = eng.train({"rollout": rollout, "ref_logprobs": {"logprobs": ref},
                           "advantages": adv}, loss="grpo", seed=i, **KL)
        out.append((stats["kl_coef"], stats["kl"]))
    return out


def test_hf_and_fast_engines_carry_the_same_coefficients():
    from graphrl.backends.engines.fast import FastEngine
    from graphrl.backends.engines.hf import HFEngine

    hf = engine_coefficients(HFEngine)
    assert hf[0][0] == KL["kl_coef"]
    for (coef, kl), (after, _) in zip(hf, hf[1:]):
        assert after == ziegler(coef, kl, KL["kl_target"], KL["kl_gain"])
    fast = engine_coefficients(FastEngine)
    assert [c for c, _ in fast] == pytest.approx([c for c, _ in hf], rel=1e-6)
