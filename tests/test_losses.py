"""The loss options against their papers' formulas, written out here on small hand-made
tensors (graphrl/loss_math.py, graphrl/builtin_losses.py), masked reductions that never
let a masked position through, and micro-batch splits that sum to the whole minibatch."""
from __future__ import annotations

import math

import pytest
import torch

import graphrl as gr
from graphrl import loss_math as lm
from graphrl.backends.engines.train_loop import bind_loss, loss_weights, micro_batches
from graphrl.builtin_losses import BUILTIN
from graphrl.errors import TraceError

# 3 sequences, 5 columns; the responses have 3, 1 and 4 tokens (unequal lengths)
MASK = torch.tensor([[0, 1, 1, 1, 0],
                     [0, 1, 0, 0, 0],
                     [0, 1, 1, 1, 1]], dtype=torch.float32)
NEW = torch.tensor([[0.0, -1.0, -0.5, -2.0, 0.0],
                    [0.0, -0.3, 0.0, 0.0, 0.0],
                    [0.0, -1.2, -0.1, -0.7, -0.9]])
OLD = NEW + torch.tensor([[0.0, 0.3, -0.4, 0.05, 0.0],
                          [0.0, -0.5, 0.0, 0.0, 0.0],
                          [0.0, 0.1, 0.2, -0.25, 0.6]])
REF = NEW + 0.2 * torch.arange(15, dtype=torch.float32).reshape(3, 5).sin()
ADV = torch.tensor([1.0, -1.0, 0.5])[:, None].expand(3, 5).contiguous()


def batch(new=NEW, old=OLD, mask=MASK, adv=ADV, ref=REF):
    return {"rollout": {"response_mask": mask, "tokens": torch.zeros_like(mask).long()},
            "old_logprobs": {"logprobs": old}, "ref_logprobs": {"logprobs": ref},
            "advantages": {"advantages": adv}}


def run(name, mb=None, new=NEW, **options):
    """(loss, gradient w.r.t. the new log-probs, stats) of a built-in loss."""
    x = new.clone().requires_grad_()
    value, stats = BUILTIN[name](lambda r: x, mb or batch(new=new), **options)
    value.backward()
    return value.detach(), x.grad, stats


def rows(mask):
    """Each row's response positions, as Python lists (the formulas below loop)."""
    return [[t for t in range(mask.shape[1]) if mask[i, t] > 0] for i in range(mask.shape[0])]


def ppo_terms(low, high, dual=0.0):
    """Per-token PPO objective, written out: min(r A, clip(r, 1-low, 1+high) A)
    (Schulman et al. 2017, eq. 7; DAPO's clip-higher, Yu et al. 2025, eq. 10), and for
    A < 0 with dual-clip c: max(that, c A) (Ye et al. 2020, eq. 5)."""
    out = {}
    for i, ts in enumerate(rows(MASK)):
        for t in ts:
            r = math.exp(NEW[i, t] - OLD[i, t])
            a = float(ADV[i, t])
            obj = min(r * a, min(max(r, 1 - low), 1 + high) * a)
            if dual and a < 0:
                obj = max(obj, dual * a)
            out[i, t] = obj
    return out


def test_token_mean_is_ppo_and_the_default_is_the_old_formula():
    terms = ppo_terms(0.2, 0.2)
    want = -sum(terms.values()) / len(terms)        # DAPO eq. 8: over all tokens
    value, grad, stats = run("ppo")
    assert value.item() == pytest.approx(want, rel=1e-6)
    # the pre-LossDef formula, as it was: -(min(rA, clip(r)A) * mask).sum() / mask.sum()
    x = NEW.clone().requires_grad_()
    ratio = torch.exp(x - OLD)
    old = -(torch.minimum(ratio * ADV, ratio.clamp(0.8, 1.2) * ADV) * MASK).sum() / MASK.sum()
    old.backward()
    assert torch.equal(value, old.detach()) and torch.equal(grad, x.grad)


@pytest.mark.parametrize("mode", list(lm.AGGREGATIONS))
def test_aggregation_modes_against_their_formulas(mode):
    terms = ppo_terms(0.2, 0.2)
    per_row = [[terms[i, t] for t in ts] for i, ts in enumerate(rows(MASK))]
    width = 4      # responses start at column 1 of 5: generate's max_new_tokens
    want = {"token-mean": sum(map(sum, per_row)) / sum(map(len, per_row)),       # DAPO
            "seq-mean-token-mean": sum(sum(r) / len(r) for r in per_row) / 3,   # GRPO
            "seq-mean-token-sum": sum(sum(r) for r in per_row) / 3,
            "seq-mean-token-sum-norm": sum(sum(r) for r in per_row) / (3 * width),  # Dr.GRPO
            }[mode]
    value, _, _ = run("ppo", aggregation=mode)
    assert value.item() == pytest.approx(-want, rel=1e-6)
    if mode == "seq-mean-token-sum-norm":   # a given constant L (TRL's max_completion_length)
        value, _, _ = run("ppo", aggregation=mode, norm_length=10.0)
        assert value.item() == pytest.approx(-sum(sum(r) for r in per_row) / 30, rel=1e-6)


@pytest.mark.parametrize("mode", list(lm.AGGREGATIONS))
def test_micro_batch_splits_sum_to_the_whole_minibatch(mode):
    """Every aggregation mode is exact under micro-batch splits: each part's loss weighted
    by its share of the loss's measure (tokens for token-mean, rows for the others)
    gives the whole minibatch's gradient, with parts of unequal token counts."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(6, 7)
    for i, n in enumerate([1, 5, 2, 6, 3, 4]):
        mask[i, 1:1 + n] = 1
    new = -torch.rand(6, 7, generator=g)
    mb = batch(new=new, old=new - 0.3 * torch.randn(6, 7, generator=g), mask=mask,
               adv=torch.randn(6, 7, generator=g), ref=new + 0.1)
    options = {"aggregation": mode, "clip": 0.1, "kl_coef": 0.3}
    bound = bind_loss("m", "grpo", options)
    whole = new.clone().requires_grad_()
    bound(lambda r: whole, mb, **options)[0].backward()
    for parts in (2, 3):
        mbs = micro_batches("m", mb, torch.arange(6), parts)
        weights = loss_weights(mbs, measure=bound.measure)
        x = new.clone().requires_grad_()
        for k, (w, part) in enumerate(zip(weights, mbs)):
            rows_k = slice(k * 6 // parts, (k + 1) * 6 // parts)
            (bound(lambda r: x[rows_k], part, **options)[0] * float(w)).backward()
        assert torch.allclose(x.grad, whole.grad, atol=1e-7), (mode, parts)


def test_clip_higher_and_dual_clip():
    for low, high, dual in ((0.2, 0.28, 0.0), (0.1, 0.3, 3.0), (0.2, 0.2, 1.5)):
        terms = ppo_terms(low, high, dual)
        value, _, stats = run("ppo", clip=(low, high), dual_clip=dual)
        assert value.item() == pytest.approx(-sum(terms.values()) / len(terms), rel=1e-6)
        outside = [1 - low > math.exp(NEW[i, t] - OLD[i, t]) or
                   math.exp(NEW[i, t] - OLD[i, t]) > 1 + high for i, t in terms]
        assert stats["clip_fraction"] == pytest.approx(sum(outside) / len(outside))
    # dual-clip bounds the loss of a negative advantage with a huge ratio: c |A| per token
    new = OLD.clone()
    new[1, 1] = OLD[1, 1] + 5.0       # ratio e^5 on the row with A = -1
    value, grad, _ = run("ppo", mb=batch(new=new), new=new, dual_clip=3.0)
    # the other tokens have ratio 1: 3 tokens of A = 1, 4 of A = 0.5, and -3 for (1, 1)
    assert value.item() == pytest.approx(-(3 * 1.0 + 4 * 0.5 - 3.0) / 8, rel=1e-6)
    assert grad[1, 1] == 0.0          # the bounded term carries no gradient
    plain, _, _ = run("ppo", mb=batch(new=new), new=new)
    assert plain.item() == pytest.approx(-(3 * 1.0 + 4 * 0.5 - math.exp(5.0)) / 8, rel=1e-5)


def test_gspo_sequence_ratio():
    """GSPO (Zheng et al. 2025, eqs. 5 and 7): s_i = exp(mean_t log(pi/pi_old)), the
    objective 1/G sum_i min(s_i A_i, clip(s_i, 1-low, 1+high) A_i)."""
    low, high = 3e-4, 4e-4
    want = 0.0
    for i, ts in enumerate(rows(MASK)):
        s = math.exp(sum(float(NEW[i, t] - OLD[i, t]) for t in ts) / len(ts))
        a = float(ADV[i, 1])
        want += min(s * a, min(max(s, 1 - low), 1 + high) * a) / 3
    value, grad, _ = run("grpo", ratio="sequence", clip=(low, high),
                         aggregation="seq-mean-token-mean", kl_coef=0.0)
    assert value.item() == pytest.approx(-want, rel=1e-6)
    # unclipped (tiny log-ratios): d/d logpi_it = -A_i s_i / (G |o_i|), the same for each t
    small = OLD + 1e-5 * MASK
    _, grad, _ = run("grpo", mb=batch(new=small), new=small, ratio="sequence",
                     aggregation="seq-mean-token-mean", kl_coef=0.0, clip=(3e-4, 4e-4))
    for i, ts in enumerate(rows(MASK)):
        s = math.exp(1e-5)
        for t in ts:
            assert grad[i, t].item() == pytest.approx(-float(ADV[i, 1]) * s / (3 * len(ts)),
                                                      rel=1e-4)
    assert grad[MASK == 0].abs().max() == 0


@pytest.mark.parametrize("estimator", lm.KL_ESTIMATORS)
def test_kl_estimators(estimator):
    """Schulman 2020: with r = pi_ref / pi, k1 = -log r, k2 = (log r)^2 / 2,
    k3 = (r - 1) - log r; grpo adds kl_coef times their token mean."""
    per = []
    for i, ts in enumerate(rows(MASK)):
        for t in ts:
            logr = float(REF[i, t] - NEW[i, t])
            per.append({"k1": -logr, "k2": logr ** 2 / 2,
                        "k3": math.exp(logr) - 1 - logr}[estimator])
    _, _, stats = run("grpo", kl_estimator=estimator, kl_coef=0.5)
    assert stats["kl"] == pytest.approx(sum(per) / len(per), rel=1e-5)
    surrogate, _, _ = run("ppo")
    value, _, _ = run("grpo", kl_estimator=estimator, kl_coef=0.5)
    assert value.item() == pytest.approx(surrogate.item() + 0.5 * sum(per) / len(per),
                                         rel=1e-5)


def test_adaptive_kl_controller():
    """Ziegler et al. 2019, §2.2: e = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta (1 + e n / horizon)."""
    assert lm.adaptive_kl_coef(0.1, 6.0, 5.0, 100.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert lm.adaptive_kl_coef(0.1, 100.0, 5.0, 100.0, 10) == pytest.approx(0.1 * 1.02)
    assert lm.adaptive_kl_coef(0.1, 0.0, 5.0, 100.0, 50) == pytest.approx(0.1 * 0.9)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), 1e4])
def test_masked_positions_never_reach_the_loss_or_its_gradient(bad):
    """A masked position (prompt, padding) holding inf, NaN or a log-ratio of 1e4 (whose
    exp overflows fp32) changes neither the loss nor the gradient."""
    new = NEW.clone()
    new[MASK == 0] = bad
    ref = REF.clone()
    ref[MASK == 0] = -bad if not math.isnan(bad) else bad
    adv = ADV.clone()
    adv[MASK == 0] = bad
    mb = batch(new=new, ref=ref, adv=adv)
    for name, opts in (("ppo", {}), ("grpo", {"ratio": "sequence"}),
                       ("grpo", {"aggregation": "seq-mean-token-sum-norm", "dual_clip": 2.0})):
        value, grad, stats = run(name, mb=mb, new=new, **opts)
        clean_value, clean_grad, clean_stats = run(name, **opts)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        assert value.item() == pytest.approx(clean_value.item(), rel=1e-6)
        assert torch.allclose(grad, clean_grad)
        assert stats == pytest.approx(clean_stats)
    # the clipped value loss: bad values and returns at masked positions change nothing
    values = {"old_values": {"values": torch.where(MASK > 0, REF, bad)},
              "returns": {"returns": torch.where(MASK > 0, OLD, bad)}}
    clean = {"old_values": {"values": REF}, "returns": {"returns": OLD}}
    got = [run("value", mb={**batch(new=new), **v}, new=new) for v in (values, clean)]
    assert torch.isfinite(got[0][1]).all() and torch.equal(got[0][0], got[1][0])
    assert torch.allclose(got[0][1], got[1][1]) and got[0][2] == got[1][2]
    x = torch.tensor([1.0, bad, 3.0])
    assert lm.masked_mean(x, torch.tensor([1.0, 0.0, 1.0])).item() == 2.0
    assert lm.masked_mean(x, torch.zeros(3)).item() == 0.0


def _trace(train_kwargs, loss="ppo"):
    from graphrl.ops import ADV_FIELDS
    from graphrl.signatures import ADVANTAGES, ROLLOUT, prompts_spec
    from graphrl.trace import Model, trace
    from graphrl.types import llama2

    advantage = gr.ops.op("adv", (ROLLOUT,), (("advantages", ADVANTAGES, ADV_FIELDS),))(
        lambda r: {"advantages": r["response_mask"]})

    def step(policy, prompts):
        r = policy.generate(prompts, max_new_tokens=4)
        lp = policy.forward(r)
        return {"s": policy.train(loss=loss, rollout=r, old_logprobs=lp,
                                  advantages=advantage(r), **train_kwargs)}
    return trace(step, [Model("policy", llama2("7b"), "policy", trainable=True)],
                 prompts=prompts_spec(2, 8))


@pytest.mark.parametrize("kwargs, needle", [
    ({"clip": (0.28, 0.2)}, "high side of the clip range is below the low side"),
    ({"dual_clip": 1.0}, "dual_clip=1.0 must be > 1"),
    ({"aggregation": "seq-mean"}, "aggregation='seq-mean' (known: token-mean"),
    ({"ratio": "seq"}, "ratio='seq' (known: token, sequence)"),
    ({"aggregation": 3}, "aggregation=3 must be a string"),
    ({"clip": (0.1, 0.2, 0.3)}, "must be a number >= 0"),
    ({"entropy": 0.1}, "unknown argument 'entropy'"),
])
def test_contradictory_options_are_trace_errors(kwargs, needle):
    with pytest.raises(TraceError) as e:
        _trace(kwargs)
    assert "policy.train" in str(e.value) and needle in str(e.value), str(e.value)


def test_asymmetric_clip_is_two_attributes_and_symmetric_stays_one():
    node = next(n for n in _trace({"clip": (0.2, 0.28)}).graph.nodes if n.target == "train")
    assert node.attr("clip") == 0.2 and node.attr("clip_high") == 0.28
    node = next(n for n in _trace({"clip": (0.2, 0.2)}).graph.nodes if n.target == "train")
    assert node.attr("clip") == 0.2 and node.attr("clip_high") is None


def test_unknown_loss_names_a_suggestion():
    with pytest.raises(TraceError, match=r"unknown loss 'gpro' .*did you mean 'grpo'"):
        _trace({}, loss="gpro")


def test_two_losses_with_one_name_are_refused():
    other = gr.loss("ppo", inputs=BUILTIN["ppo"].inputs)(lambda f, mb: None)
    with pytest.raises(TraceError, match="two different losses share the name 'ppo'"):
        _trace({}, loss=other)


def test_a_loss_that_raises_or_returns_garbage_names_itself():
    from graphrl.loss_def import LossFailed
    from graphrl.signatures import ROLLOUT

    def make(name, fn, **kw):
        return gr.loss(name, inputs=(("rollout", ROLLOUT),), **kw)(fn)

    forward = lambda r: torch.zeros(()) + 1.0  # noqa: E731
    cases = [(make("raises", lambda f, mb: mb["nope"]), r"raised KeyError: 'nope'"),
             (make("scalar", lambda f, mb: 1.0), r"must return \(scalar loss tensor, stats"),
             (make("nostats", lambda f, mb: (f(mb["rollout"]), {}), stats=("loss", "kl")),
              r"returned stats without loss, kl"),
             (make("inf", lambda f, mb: (f(mb["rollout"]) * float("inf"), {"loss": 0.0})),
              r"returned a non-finite loss \(inf\); no update was made")]
    for loss_def, needle in cases:
        with pytest.raises(LossFailed, match=rf"loss '{loss_def.name}' \(.*test_losses.py\) "
                                             + needle):
            loss_def.run(forward, batch(), {})
    with pytest.raises(gr.UsageError,
                       match=r"loss 'ppo' \(.*builtin_losses.py\): unknown option\(s\) cilp"):
        BUILTIN["ppo"].run(forward, batch(), {"cilp": 0.1})


ENT = torch.tensor([[0.0, 1.5, 0.2, 0.9, 7.0],
                    [0.0, 2.0, 5.0, 5.0, 5.0],
                    [0.0, 0.1, 0.4, 1.1, 0.6]])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_entropy_bonus(mode):
    """PPO's objective with the entropy bonus (Schulman et al. 2017, eq. 9): the loss is
    the surrogate's minus c times the token entropy, aggregated alike; its gradient
    reaches the entropies of response tokens only."""
    per_row = [[float(ENT[i, t]) for t in ts] for i, ts in enumerate(rows(MASK))]
    mean = {"token-mean": sum(map(sum, per_row)) / sum(map(len, per_row)),
            "seq-mean-token-mean": sum(sum(r) / len(r) for r in per_row) / 3}[mode]
    ent = ENT.clone().requires_grad_()

    def forward(r):
        raise AssertionError("with entropy_coef the loss takes one pass, with_entropy")
    forward.with_entropy = lambda r: (NEW, ent)
    value, _ = BUILTIN["grpo"](forward, batch(), entropy_coef=0.05, aggregation=mode)
    base, _ = BUILTIN["grpo"](lambda r: NEW, batch(), aggregation=mode)
    assert value.item() == pytest.approx(base.item() - 0.05 * mean, rel=1e-6)
    value.backward()
    assert ent.grad[MASK == 0].abs().max() == 0 and ent.grad[MASK > 0].lt(0).all()


def test_entropy_needs_an_engine_that_gives_it():
    from graphrl.loss_def import LossFailed

    with pytest.raises(LossFailed, match="loss 'ppo' .* raised ValueError: entropy_coef "
                                         "needs the token entropies .*megatron does not"):
        BUILTIN["ppo"].run(lambda r: NEW, batch(), {"entropy_coef": 0.01})


def test_hf_engine_gives_log_probs_and_entropies_in_one_pass():
    """forward.with_entropy: the same log-probs as the forward, and each position's
    -sum_v p log p, computed here from the HF module's own logits."""
    from graphrl.backends.engines.hf import HFEngine

    decl = gr.ModelDecl("m", gr.ModelSpec("llama", 16, 32, 1, 2, 2, 64, 32, "lm",
                                          dtype="fp32"), "policy", True)
    eng = HFEngine(decl, {}, seed=0)
    tokens = torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(0))
    payload = {"tokens": tokens, "attention_mask": torch.ones(3, 6)}
    forward = eng.loss_forward()
    lp, ent = forward.with_entropy(payload)
    assert torch.allclose(lp, forward(payload), atol=1e-6)
    logits = eng.module(input_ids=tokens).logits[:, :-1]
    p = torch.softmax(logits, -1)
    want = -(p * torch.log(p)).sum(-1)
    assert torch.allclose(ent[:, 1:], want, atol=1e-5) and ent[:, 0].eq(0).all()
    assert ent[:, 1:].gt(0).all() and ent.le(math.log(16) + 1e-5).all()
