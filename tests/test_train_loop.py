"""The shared training loop (backends/engines/train_loop.py) and on-policy PPO/GRPO
without the old-log-prob forward."""
from __future__ import annotations

import pytest
import torch

import graphrl as gr
from graphrl.backends.engines.hf import HFEngine
from graphrl.backends.engines.train_loop import (WeightedStats, loss_weights, micro_batches,
                                                 minibatch_indices)
from graphrl.errors import TraceError, UsageError


def tiny() -> gr.ModelDecl:
    return gr.ModelDecl("m", gr.ModelSpec("llama", 16, 32, 1, 2, 2, 64, 32, "lm"),
                        "policy", True)


def test_minibatches_cover_every_row_once_per_epoch():
    parts = list(minibatch_indices("m", 12, seed=3, epochs=2, minibatches=3))
    assert len(parts) == 6 and all(p.numel() == 4 for p in parts)
    for epoch in (parts[:3], parts[3:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(12))
    with pytest.raises(UsageError, match="batch 12 does not split into 5"):
        list(minibatch_indices("m", 12, seed=0, epochs=1, minibatches=5))


def test_micro_batch_weights_are_token_shares():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    inputs = {"rollout": {"tokens": torch.zeros(4, 3, dtype=torch.long),
                          "response_mask": mask}}
    mbs = micro_batches("m", inputs, torch.arange(4), 2)
    w = loss_weights(mbs)
    assert w.tolist() == [4 / 6, 2 / 6]
    doubled = loss_weights(mbs, lambda t: t.mul_(2))   # a second rank with as many tokens
    assert doubled.tolist() == [4 / 12, 2 / 12]
    s = WeightedStats()
    for wi in w.tolist():
        s.add(wi, {"loss": 3.0})
    assert s.result() == {"loss": pytest.approx(3.0)}
    with pytest.raises(UsageError, match="3 rows do not split into 2"):
        micro_batches("m", inputs, torch.arange(3), 2)


def _rollout(e: HFEngine) -> dict:
    r = e.generate({"tokens": torch.randint(0, 16, (4, 3), generator=torch.Generator()
                                            .manual_seed(0))},
                   max_new_tokens=5, samples=2, seed=1, stop_at_eos=False)
    adv = torch.linspace(-1, 1, 8)[:, None].expand(8, r["tokens"].shape[1]).contiguous()
    return {"rollout": r, "advantages": {"advantages": adv}}


def test_on_policy_grpo_skips_the_old_forward_with_the_same_update():
    a, b = HFEngine(tiny(), {}, seed=0), HFEngine(tiny(), {}, seed=0)
    batch = _rollout(a)
    ref = {"logprobs": a.forward(batch["rollout"])["logprobs"] - 0.1}
    with_old = a.train({**batch, "old_logprobs": a.forward(batch["rollout"]),
                        "ref_logprobs": ref}, loss="grpo", seed=0)
    on_policy = b.train({**batch, "ref_logprobs": ref}, loss="grpo", seed=0)
    assert with_old["clip_fraction"] == on_policy["clip_fraction"] == 0.0
    assert on_policy["loss"] == pytest.approx(with_old["loss"], abs=1e-6)
    wa, wb = a.export_weights(), b.export_weights()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    with pytest.raises(UsageError, match="without old_logprobs .* one optimizer pass"):
        b.train({**batch, "ref_logprobs": ref}, loss="grpo", seed=0, epochs=2)


def _grpo_program(old_forward: bool, **train_kw):
    from graphrl.signatures import ROLLOUT, SCORES, prompts_spec
    from graphrl.trace import Model, trace
    from graphrl.types import llama2

    score = gr.ops.op("length_score", (ROLLOUT,), (("score", SCORES, (
        gr.Field("score", "f32", per_token=False),)),))(
        lambda r: {"score": r["response_mask"].sum(-1)})

    def step(policy, reference, prompts):
        r = policy.generate(prompts, max_new_tokens=4, samples=2)
        adv = gr.ops.group_advantages(r, score(r), group_size=2)
        old = {"old_logprobs": policy.forward(r)} if old_forward else {}
        return {"s": policy.train(loss="grpo", rollout=r, ref_logprobs=reference.forward(r),
                                  advantages=adv, **old, **train_kw)}

    return trace(step, [Model("policy", llama2("7b"), "policy", trainable=True),
                        Model("reference", llama2("7b"), "reference")],
                 prompts=prompts_spec(2, 8))


def test_tracing_on_policy_grpo_leaves_the_forward_out():
    full, on_policy = _grpo_program(True), _grpo_program(False)
    forwards = [sum(n.target == "forward" for n in p.graph.nodes) for p in (full, on_policy)]
    assert forwards == [2, 1]
    train = next(n for n in on_policy.graph.nodes if n.target == "train")
    assert len(train.inputs) == 4     # weights, rollout, ref log-probs, advantages
    with pytest.raises(TraceError, match="old_logprobs may be left out only for one "
                                         "optimizer pass.*minibatches=2"):
        _grpo_program(False, minibatches=2)
