"""The advantage estimators (graphrl/estimators.py) against their papers' formulas,
written out here independently on small hand-made tensors with responses of unequal
lengths; and their trace-time checks."""
from __future__ import annotations

import math
import statistics

import pytest

import graphrl as gr
from graphrl import ops

torch = pytest.importorskip("torch")

# 6 rollouts (2 prompts x 3 samples), prompt length 2, up to 4 response tokens
LENGTHS = [4, 2, 3, 1, 4, 2]
SCORES = [1.0, 0.0, 0.5, 0.2, 0.9, 0.2]


def rollout(lengths=LENGTHS):
    b, seq = len(lengths), 6
    mask = torch.zeros(b, seq)
    for i, n in enumerate(lengths):
        mask[i, 2:2 + n] = 1.0
    attn = mask.clone()
    attn[:, :2] = 1.0
    tokens = torch.arange(b * seq).view(b, seq) % 7
    return {"tokens": tokens, "attention_mask": attn, "response_mask": mask,
            "row": torch.arange(b) // 3}


def scores(values=SCORES):
    return {"score": torch.tensor(values)}


def per_token(per_seq, lengths=LENGTHS):
    """The expected [b, seq] tensor: per_seq[i] on row i's response tokens, 0 elsewhere."""
    out = torch.zeros(len(lengths), 6)
    for i, n in enumerate(lengths):
        out[i, 2:2 + n] = per_seq[i]
    return out


def close(adv, expected, tol=1e-5):
    assert torch.allclose(adv["advantages"], expected, atol=tol), (adv["advantages"], expected)


def groups(values, k):
    return [values[i:i + k] for i in range(0, len(values), k)]


def test_grpo_scales():
    """GRPO (Shao et al. 2024): (r - mean_g) / (std_g + eps), sample std; batch std
    (Liu et al. 2025, Tricks or Traps): / (std over the batch + eps); Dr. GRPO (Liu et
    al. 2025): r - mean_g."""
    eps = 1e-4
    for scale in ("group", "batch", "none"):
        want = []
        for g in groups(SCORES, 3):
            m = sum(g) / 3
            std = {"group": statistics.stdev(g), "batch": statistics.stdev(SCORES),
                   "none": None}[scale]
            want += [(r - m) / (std + eps) if std is not None else r - m for r in g]
        close(ops.group_advantages.fn(rollout(), scores(), group_size=3, scale=scale),
              per_token(want))


def test_rloo():
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the other k-1 rewards."""
    want = []
    for g in groups(SCORES, 3):
        want += [r - (sum(g) - r) / 2 for r in g]
    close(ops.rloo.fn(rollout(), scores(), group_size=3), per_token(want))
    # the leave-one-out baseline equals k/(k-1) times GRPO's unscaled advantage
    dr = ops.group_advantages.fn(rollout(), scores(), group_size=3, scale="none")
    close(ops.rloo.fn(rollout(), scores(), group_size=3), dr["advantages"] * 1.5)


def whiten(per_tok, lengths=LENGTHS):
    """Normalise the listed response-token values over all of them (population std)."""
    flat = [v for row, n in zip(per_tok, lengths) for v in row[:n]]
    m = sum(flat) / len(flat)
    sd = math.sqrt(sum((v - m) ** 2 for v in flat) / len(flat) + 1e-6)
    return [[(v - m) / sd for v in row[:n]] for row, n in zip(per_tok, lengths)]


def as_tensor(rows, lengths=LENGTHS):
    out = torch.zeros(len(lengths), 6)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        out[i, 2:2 + n] = torch.tensor(row)
    return out


def test_reinforce_pp():
    """REINFORCE++ (Hu 2025): r_t = -beta (logp - ref) (+ score at the last token),
    G_t = sum_{s>=t} gamma^(s-t) r_s, normalised over the batch's response tokens."""
    g = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(6, 6, generator=g), -torch.rand(6, 6, generator=g)
    beta, gamma = 0.1, 0.9
    rets = []
    for i, n in enumerate(LENGTHS):
        r = [-beta * float(lp[i, 2 + t] - ref[i, 2 + t]) for t in range(n)]
        r[-1] += SCORES[i]
        rets.append([sum(gamma ** (s - t) * r[s] for s in range(t, n)) for t in range(n)])
    out = ops.reinforce_pp.fn(rollout(), scores(), {"logprobs": lp}, {"logprobs": ref},
                              kl_coef=beta, gamma=gamma)
    close(out, as_tensor(whiten(rets)), tol=1e-4)


def test_reinforce_pp_baseline():
    """REINFORCE++-baseline (Hu 2025): r - mean_group(r) on every response token, then
    normalised over the batch's response tokens."""
    centred = []
    for g in groups(SCORES, 3):
        centred += [r - sum(g) / 3 for r in g]
    rows = [[c] * n for c, n in zip(centred, LENGTHS)]
    close(ops.reinforce_pp_baseline.fn(rollout(), scores(), group_size=3),
          as_tensor(whiten(rows)), tol=1e-4)


def test_remax():
    """ReMax (Li et al. 2023): A = r(x, y) - r(x, y_greedy), the prompt's greedy score."""
    greedy = [0.4, 0.6]
    want = [r - greedy[i // 3] for i, r in enumerate(SCORES)]
    close(ops.remax.fn(rollout(), scores(), scores(greedy)), per_token(want))


def test_pass_at_k():
    """GRPO pass@k (Chen et al. 2025), from its definition: the group reward is the mean
    over all k-subsets of max(correct), a sample's the mean over the subsets holding it;
    advantage = (its mean - group mean) / group std."""
    from itertools import combinations

    values = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]   # 2 groups of 4, threshold 0.5
    lengths = [4, 2, 3, 1, 4, 2, 3, 3]
    k = 2
    want = []
    for g in groups(values, 4):
        subsets = list(combinations(range(4), k))
        rew = [max(g[j] for j in s) for s in subsets]
        mean = sum(rew) / len(rew)
        sd = math.sqrt(mean * (1 - mean))
        for i in range(4):
            mine = [r for s, r in zip(subsets, rew) if i in s]
            want.append((sum(mine) / len(mine) - mean) / sd)
    out = ops.pass_at_k.fn(rollout(lengths), scores(values), group_size=4, k=k)
    close(out, per_token(want, lengths), tol=1e-4)
    # all correct or all wrong: no signal
    out = ops.pass_at_k.fn(rollout(lengths), scores([1.0] * 4 + [0.0] * 4), group_size=4, k=2)
    assert float(out["advantages"].abs().sum()) == 0.0


# -- trace-time checks ---------------------------------------------------------------------
def tiny_policy():
    from common import llama_config

    return gr.Model("policy", llama_config(), role="policy", trainable=True)


def scorer(name):
    """A Rollout -> Scores op (traced only, never run here)."""
    return ops.op(name, (gr.signatures.ROLLOUT,), ((name, gr.signatures.SCORES, (
        gr.Field("score", "f32", per_token=False),)),))(lambda r: {})


def trace_with(body, batch=4):
    def step(prompts, policy):
        rollout = policy.generate(prompts, max_new_tokens=4, samples=2)
        score = scorer("score")(rollout)
        return {"adv": body(rollout, score, prompts, policy)}
    return gr.trace(step, [tiny_policy()], prompts=gr.prompts_spec(batch, 4))


@pytest.mark.parametrize("body, message", [
    (lambda r, s, p, m: ops.group_advantages(r, s, group_size=1),
     r"op group_advantages: group_size=1 has no baseline"),
    (lambda r, s, p, m: ops.rloo(r, s, group_size=3), r"group_size=3 does not divide the rollout's 8 rows"),
    (lambda r, s, p, m: ops.group_advantages(r, s, group_size=2, scale="groop"),
     r"unknown scale 'groop' \(did you mean 'group'\?\)"),
    (lambda r, s, p, m: ops.group_advantages(r, s, group_size=2, scale="none", eps=0.1),
     r"eps=0.1 contradicts scale='none'"),
    (lambda r, s, p, m: ops.rloo(r, s, group_sise=2),
     r"unknown argument 'group_sise' \(did you mean 'group_size'\?\)"),
    (lambda r, s, p, m: ops.pass_at_k(r, s, group_size=2),
     r"missing a required argument: 'k'"),
    (lambda r, s, p, m: ops.pass_at_k(r, s, group_size=2, k=3),
     r"k=3 must be an int in \[1, group_size=2\]"),
    (lambda r, s, p, m: ops.remax(r, s, ops.group_advantages(r, s, group_size=2)),
     r"payload mismatch"),
])
def test_bad_options_are_refused_at_trace_time(body, message):
    with pytest.raises(gr.TraceError, match=message):
        trace_with(body)


def test_remax_traces_two_generates():
    """ReMax's greedy baseline is a second generate on the same prompts."""
    def body(r, s, prompts, policy):
        greedy = policy.generate(prompts, max_new_tokens=4, temperature=0.0)
        return ops.remax(r, s, scorer("greedy_score")(greedy))
    program = trace_with(body)
    gens = [n for n in program.graph.nodes if n.target == "generate"]
    assert [n.attr("temperature") for n in gens] == [1.0, 0.0]
    assert [n.outputs[0].spec.batch for n in gens] == [8, 4]


def test_unknown_estimator_name():
    assert ops.estimator("rloo") is ops.rloo
    with pytest.raises(gr.TraceError, match=r"unknown advantage estimator 'rlo' \(did you "
                                            r"mean 'rloo'\?\)"):
        ops.estimator("rlo")
