"""A user's loss in its own file (tests/data/user_loss.py) runs through tracing, the
engines and the local backend as the built-ins do; bad losses stop with one clear line."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch

import graphrl as gr
from common import llama_config, prompt_data, task_score
from conftest import load_build
from graphrl.backends.engines.hf import HFEngine
from graphrl.errors import ExecutionError, TraceError, UsageError
from graphrl.runner import run_experiment

USER = str(Path(__file__).parent / "data" / "user_loss.py")


def tiny(dtype: str = "bf16") -> gr.ModelDecl:
    return gr.ModelDecl("m", gr.ModelSpec("llama", 16, 32, 1, 2, 2, 64, 32, "lm",
                                          dtype=dtype), "policy", True)


def test_user_loss_trains_as_the_builtin_with_its_formula():
    """seq_mean_pg (plain torch in the user's file) is PPO's surrogate averaged per
    sequence: two engines, one on it and one on the built-in ppo with
    aggregation="seq-mean-token-mean", take the same steps (2 epochs x 2 minibatches,
    responses of unequal lengths)."""
    user = gr.load_loss(f"{USER}:seq_mean_pg")
    assert user.weight == "rows" and user.source.endswith("user_loss.py")
    a, b = HFEngine(tiny(), {}, seed=0), HFEngine(tiny(), {}, seed=0)
    r = a.generate({"tokens": torch.randint(0, 16, (4, 3), generator=torch.Generator()
                                            .manual_seed(0))},
                   max_new_tokens=5, samples=2, seed=1)
    r["response_mask"][::3, 6:] = 0     # unequal lengths
    g = torch.Generator().manual_seed(2)
    batch = {"rollout": r, "old_logprobs": {"logprobs": a.forward(r)["logprobs"] +
                                            0.05 * torch.randn(8, 8, generator=g)},
             "advantages": {"advantages": torch.randn(8, 8, generator=g)}}
    sa = a.train(batch, loss=user, seed=0, epochs=2, minibatches=2, clip=0.1)
    sb = b.train(batch, loss="ppo", seed=0, epochs=2, minibatches=2, clip=0.1,
                 aggregation="seq-mean-token-mean")
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-5) and "ratio_mean" in sa
    wa, wb = a.export_weights(), b.export_weights()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_user_loss_on_the_fast_engine_trains_like_hf():
    """The fast engine's fused forward (Llama) feeds a user's loss as HF's forward does:
    the same losses and weights after 2 epochs x 2 minibatches and a step with the
    entropy bonus (fp32: both exact to float rounding)."""
    from graphrl.backends.engines.registry import create_engine

    user = gr.load_loss(f"{USER}:seq_mean_pg")
    hf = HFEngine(tiny("fp32"), {}, seed=0)
    fast = create_engine("fast", tiny("fp32"), {}, "cpu", 0)
    assert fast.fused_forward
    fast.load_weights(hf.export_weights())
    start = hf.export_weights()
    r = hf.generate({"tokens": torch.randint(0, 16, (4, 3), generator=torch.Generator()
                                             .manual_seed(0))},
                    max_new_tokens=5, samples=2, seed=1)
    g = torch.Generator().manual_seed(2)
    batch = {"rollout": r, "old_logprobs": {"logprobs": hf.forward(r)["logprobs"]},
             "advantages": {"advantages": torch.randn(8, 8, generator=g)}}
    s1 = hf.train(batch, loss=user, seed=0, epochs=2, minibatches=2)
    s2 = fast.train(batch, loss=user, seed=0, epochs=2, minibatches=2)
    assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-5)
    # and the entropy bonus, whose token entropies both take from HF's full logits
    s1 = hf.train(batch, loss="ppo", seed=1, entropy_coef=0.1)
    s2 = fast.train(batch, loss="ppo", seed=1, entropy_coef=0.1)
    assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-5)
    wa, wb = hf.export_weights(), fast.export_weights()
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa]).norm()
    moved = torch.cat([(wa[k] - start[k]).flatten() for k in wa]).norm()
    assert diff < 1e-3 * moved, (float(diff), float(moved))


def policy_only(loss: gr.LossDef) -> gr.Experiment:
    """GRPO's step on the synthetic task with the policy alone (the task's rule-based
    score as reward; fewer engines for Ray to build), trained with `loss`."""
    from common import TASK

    score = task_score(TASK)

    def step(prompts, policy):
        rollout = policy.generate(prompts, max_new_tokens=TASK.response_len, samples=2)
        old = policy.forward(rollout)
        task = score(rollout)
        adv = gr.ops.group_advantages(rollout, task, group_size=2)
        return {"task_score": task,
                "policy_stats": policy.train(loss=loss, rollout=rollout, old_logprobs=old,
                                             advantages=adv, epochs=2, minibatches=2)}

    policy = gr.Model("policy", llama_config(hidden=32, layers=1), role="policy",
                      trainable=True, options={"lr": 2e-3}, precision="fp32")
    return gr.Experiment("user_loss_step", step, (policy,),
                         {"prompts": gr.prompts_spec(4, TASK.prompt_len)},
                         prompt_data(TASK, 4, 0), reward="task_score", iterations=2)


def test_a_user_loss_is_priced_as_the_builtin_on_the_same_payloads():
    """The cost model prices a train node from its payloads and strategy, whatever its
    loss: the same plan and predicted seconds for the user's loss and for ppo."""
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph

    def train_timing(loss):
        plan = compile_graph(policy_only(loss).program().graph, ClusterSpec.parse("1x4xcpu"),
                             "auto").plan
        n = next(n for n in plan.graph.nodes if n.target == "train")
        return n.placement, n.timing

    user = train_timing(gr.load_loss(f"{USER}:seq_mean_pg"))
    assert user[1] is not None and user == train_timing("ppo")


def _grpo(loss: str, **kw):
    opts = gr.RunOptions(batch_size=2, iterations=2, quiet=True, loss=loss, **kw)
    return dataclasses.replace(load_build("grpo")(opts), prepare=None), opts


def test_user_loss_runs_in_the_example_on_the_local_backend():
    exp, opts = _grpo(f"{USER}:seq_mean_pg")
    program = exp.program()
    train = next(n for n in program.graph.nodes if n.target == "train")
    assert train.attr("loss") == "seq_mean_pg" and program.losses["seq_mean_pg"].weight == "rows"
    assert [f.name for f in train.outputs[1].spec.fields] == ["loss", "ratio_mean"]
    summary = run_experiment(exp, opts, out=io.StringIO())
    assert all("policy_stats/ratio_mean" in row for row in summary.rows)


def test_a_nan_loss_stops_naming_the_loss_its_file_and_the_iteration():
    exp, opts = _grpo(f"{USER}:broken_loss")
    with pytest.raises(ExecutionError) as e:
        run_experiment(exp, opts, out=io.StringIO())
    text = str(e.value)
    assert "loss 'broken_loss'" in text and "user_loss.py" in text and "iteration 0" in text
    assert "non-finite loss (nan)" in text and "\n" not in text.strip()


def test_bad_loss_specs_and_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match=r"defines no loss 'seq_mean' \(did you mean "
                                         r"'seq_mean_pg'\?\)"):
        gr.load_loss(f"{USER}:seq_mean")
    with pytest.raises(UsageError, match="expected FILE.py:NAME"):
        gr.load_loss(USER)
    needs_values = tmp_path / "needs_values.py"
    needs_values.write_text(
        "import graphrl as gr\nfrom graphrl.signatures import ROLLOUT, VALUES\n"
        "@gr.loss('needs_values', inputs=(('rollout', ROLLOUT), ('values', VALUES)))\n"
        "def needs_values(forward, mb):\n    return forward(mb['rollout']).sum(), {}\n")
    with pytest.raises(TraceError, match="loss 'needs_values' needs argument.s. values"):
        _grpo(f"{needs_values}:needs_values")
    with pytest.raises(UsageError, match="ppo.py trains no loss named 'seq_mean_pg'"):
        load_build("ppo")(gr.RunOptions(loss=f"{USER}:seq_mean_pg"))
    with pytest.raises(UsageError, match="weight='sequences'"):
        gr.loss("x", inputs=(("rollout", "Rollout"),), weight="sequences")(lambda f, mb: 0)


def test_losses_pickle_for_the_ray_actors():
    """Built-ins travel by reference (the same object comes back); a user's loss from
    its file, which the actors cannot import, by value with Ray's cloudpickle."""
    import pickle

    from graphrl.builtin_losses import BUILTIN

    for d in BUILTIN.values():
        assert pickle.loads(pickle.dumps(d)) is d
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    user = gr.load_loss(f"{USER}:seq_mean_pg")
    back = cloudpickle.loads(cloudpickle.dumps(user))
    assert (back.name, back.inputs, back.stats, back.options, back.weight) == \
        (user.name, user.inputs, user.stats, user.options, user.weight)
    x = torch.zeros(2, 4, requires_grad=True)
    mb = {"rollout": {"response_mask": torch.tensor([[0., 1, 1, 0], [0, 1, 1, 1]])},
          "old_logprobs": {"logprobs": torch.zeros(2, 4) - 0.1},
          "advantages": {"advantages": torch.ones(2, 4)}}
    assert back(lambda r: x, mb)[0].item() == user(lambda r: x, mb)[0].item()


def test_the_run_record_holds_the_loss_file_and_its_hash():
    """--loss is an input of the run as --reward is: recorded with its absolute path and
    the file's sha256 (graphrl/run_record.py), so --config reruns check it."""
    from graphrl.run_record import files_record, options_record

    opts = gr.RunOptions(loss=f"{Path(USER).relative_to(Path.cwd())}:seq_mean_pg"
                         if Path(USER).is_relative_to(Path.cwd()) else f"{USER}:seq_mean_pg")
    assert options_record(opts)["loss"] == f"{USER}:seq_mean_pg"
    assert files_record(opts, {})["loss"]["path"] == USER
