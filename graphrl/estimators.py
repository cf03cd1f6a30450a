"""Advantage estimators as ops: GRPO (with its scaling choices), RLOO, REINFORCE++ (and
with a group baseline), ReMax, GRPO pass@k.

Each is an OpDef (graphrl/trace.py) whose `check` refuses bad attributes at trace time,
and whose kernel imports torch only when it runs. Scores are per sequence (the Scores
payload); every estimator broadcasts its per-sequence advantage to the response tokens
(`response_mask`), so padding after a response carries 0. A group is `group_size`
consecutive rows: the samples of one prompt, as `generate(samples=group_size)` lays them
out. `ESTIMATORS` names them all; `estimator(name)` looks one up by name.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from . import signatures as sig
from .errors import TraceError
from .trace import OpDef
from .types import Field, PayloadSpec

ADV_FIELDS = (Field("advantages", "f32"),)

SCALES = ("group", "batch", "none")
EPS = 1e-4   # added to a std before dividing (GRPO's group normalisation in TRL / verl)


def masked_whiten(x: Any, mask: Any, eps: float = 1e-6) -> Any:
    """Normalise x to zero mean, unit variance over the positions where mask is 1."""
    n = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * (var + eps).rsqrt() * mask


def check_group_size(where: str, specs: tuple[PayloadSpec, ...], attrs: Mapping[str, Any],
                     minimum: int = 2) -> int:
    """group_size: an int >= 2 (a group needs a baseline) that divides the first
    input's rows (prompts x samples). Unknown or missing attributes are refused before
    (trace.check_arguments, against the kernel's keyword arguments)."""
    g = attrs.get("group_size")
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise TraceError(f"{where}: group_size={g!r} must be an int >= {minimum} (the "
                         "samples of one prompt: generate(..., samples=group_size))")
    if g < minimum:
        raise TraceError(f"{where}: group_size={g} has no baseline: a group's advantage "
                         f"needs at least {minimum} samples of a prompt "
                         "(generate(..., samples=N) with N >= 2)")
    batch = specs[0].batch
    if batch % g:
        raise TraceError(f"{where}: group_size={g} does not divide the rollout's {batch} "
                         "rows (generate samples=group_size per prompt)")
    return g


def _groups(scores: Any, group_size: int) -> Any:
    if scores.shape[0] % group_size:
        raise ValueError(f"batch {scores.shape[0]} is not a multiple of group_size "
                         f"{group_size}")
    return scores.view(-1, group_size)


def _tokens(per_seq: Any, rollout: Mapping[str, Any]) -> dict:
    return {"advantages": per_seq.reshape(-1, 1) * rollout["response_mask"]}


# -- GRPO and its scaling choices -----------------------------------------------------------
def group_scaled(scores: Any, group_size: int, scale: str = "group", eps: float = EPS) -> Any:
    """Per-sequence GRPO advantages: score minus its group's mean, divided by
    - scale="group": the group's std (Shao et al. 2024, DeepSeekMath §4.1.2, the sample
      std, n-1, as torch.std and TRL / verl take it);
    - scale="batch": the std of all the batch's scores (group-level mean, batch-level
      std: Liu et al. 2025, "Tricks or Traps? Part I", arXiv 2508.08221, §4.1; sample std);
    - scale="none": not divided (Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like
      Training", arXiv 2503.20783, §3.1, which removes the std's difficulty bias)."""
    g = _groups(scores, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (scores.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r} (known: {', '.join(SCALES)})")
    return centred.reshape(-1)


def _check_scale(where: str, attrs: Mapping[str, Any]) -> None:
    from .nearest import suggest

    scale = attrs.get("scale", "group")
    if scale not in SCALES:
        raise TraceError(f"{where}: unknown scale {scale!r}{suggest(scale, SCALES)} "
                         f"(known: {', '.join(SCALES)}: divide by the group's std, the "
                         "batch's std, or not at all)")


def _grpo(rollout: dict, scores: dict, *, group_size: int, scale: str = "group",
          eps: float = EPS) -> dict:
    """GRPO's outcome advantage broadcast to the response tokens (group_scaled)."""
    return _tokens(group_scaled(scores["score"], group_size, scale, eps), rollout)


def _check_grpo(where: str, specs: tuple, attrs: Mapping[str, Any]) -> None:
    check_group_size(where, specs, attrs)
    _check_scale(where, attrs)
    if attrs.get("scale") == "none" and "eps" in attrs:
        raise TraceError(f"{where}: eps={attrs['eps']!r} contradicts scale='none': eps "
                         "guards a division by a std, and scale='none' divides by nothing")


# -- RLOO -----------------------------------------------------------------------------------
def _rloo(rollout: dict, scores: dict, *, group_size: int) -> dict:
    """RLOO (Ahmadian et al. 2024, "Back to Basics", §3.3; Kool et al. 2019): each
    sample's baseline is the mean score of the other k-1 samples of its prompt,
    A_i = r_i - 1/(k-1) * sum_{j != i} r_j."""
    g = _groups(scores["score"], group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return _tokens((g - others).reshape(-1), rollout)


def _check_rloo(where: str, specs: tuple, attrs: Mapping[str, Any]) -> None:
    check_group_size(where, specs, attrs)


# -- REINFORCE++ -----------------------------------------------------------------------------
def last_token_index(mask: Any) -> Any:
    """Per row, the index of its last response token."""
    import torch

    return mask.shape[1] - 1 - torch.flip(mask, [1]).argmax(dim=1)


def _reinforce_pp(rollout: dict, scores: dict, logprobs: dict, ref_logprobs: dict, *,
                  kl_coef: float = 0.01, gamma: float = 1.0) -> dict:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262, §3): the token reward is
    r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t)), plus the score at the last response
    token; the return G_t = sum_{s >= t} gamma^(s-t) r_s; the advantage is G_t normalised
    over every response token of the batch (global batch mean and std, no critic)."""
    import torch

    mask = rollout["response_mask"]
    rewards = -kl_coef * (logprobs["logprobs"] - ref_logprobs["logprobs"]) * mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += scores["score"]
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(mask.shape[1] - 1, -1, -1):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return {"advantages": masked_whiten(returns, mask)}


def _check_reinforce_pp(where: str, specs: tuple, attrs: Mapping[str, Any]) -> None:
    gamma = attrs.get("gamma", 1.0)
    if not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise TraceError(f"{where}: gamma={gamma!r} must be in [0, 1]")


def _reinforce_pp_baseline(rollout: dict, scores: dict, *, group_size: int) -> dict:
    """REINFORCE++-baseline (Hu 2025, arXiv 2501.03262, §3.2): the score minus its
    group's mean, A = r - mean_group(r), broadcast to the response tokens and then
    normalised over every response token of the batch (global mean and std); the KL
    to the reference goes into the loss (kl_coef of the grpo loss)."""
    g = _groups(scores["score"], group_size)
    centred = (g - g.mean(dim=1, keepdim=True)).reshape(-1, 1)
    mask = rollout["response_mask"]
    return {"advantages": masked_whiten(centred * mask, mask)}


# -- ReMax ----------------------------------------------------------------------------------
def _remax(rollout: dict, scores: dict, baseline_scores: dict) -> dict:
    """ReMax (Li et al. 2023, arXiv 2310.10505, Algorithm 1): the baseline is the score
    of the greedy response to the same prompt, A = r(x, y) - r(x, y_greedy); with several
    samples per prompt each sample of a prompt takes that prompt's greedy score."""
    s, b = scores["score"], baseline_scores["score"]
    if s.shape[0] % b.shape[0]:
        raise ValueError(f"{s.shape[0]} scores but {b.shape[0]} greedy baseline scores")
    return _tokens(s - b.repeat_interleave(s.shape[0] // b.shape[0]), rollout)


def _check_remax(where: str, specs: tuple, attrs: Mapping[str, Any]) -> None:
    sampled, greedy = specs[1].batch, specs[2].batch
    if greedy < 1 or sampled % greedy:
        raise TraceError(f"{where}: {sampled} sampled scores do not split into the "
                         f"{greedy} greedy baseline scores (one greedy response per prompt: "
                         "generate(prompts, temperature=0) on the same prompts)")


# -- GRPO pass@k -----------------------------------------------------------------------------
def _comb(n: Any, k: int) -> Any:
    """C(n, k) elementwise for a tensor n (0 where n < k)."""
    import torch

    n = n.to(torch.float64)
    out = torch.ones_like(n)
    for i in range(k):
        out = out * (n - i).clamp(min=0) / (i + 1)
    return out


def _pass_at_k(rollout: dict, scores: dict, *, group_size: int, k: int,
               threshold: float = 0.5, eps: float = 1e-6) -> dict:
    """GRPO with a pass@k reward (Chen et al. 2025, "Pass@k Training", arXiv 2508.10751,
    §3.3, analytical form): a sample is correct when its score >= threshold; over all
    k-subsets of a group of N with N_neg incorrect, the group reward is
    R = 1 - C(N_neg, k) / C(N, k), sigma = sqrt(R (1 - R)); a correct sample's advantage
    is (1 - R) / sigma, an incorrect one's (1 - R - C(N_neg - 1, k - 1) / C(N - 1, k - 1))
    / sigma (a subset holding it fails only when its other k-1 members all fail)."""
    import torch

    correct = _groups(scores["score"], group_size) >= threshold
    n = group_size
    n_neg = (~correct).sum(dim=1, keepdim=True)
    mean = 1.0 - _comb(n_neg, k) / math.comb(n, k)
    std = (mean * (1.0 - mean)).sqrt()
    fail_with = _comb(n_neg - 1, k - 1) / math.comb(n - 1, k - 1)
    adv = torch.where(correct, 1.0 - mean, 1.0 - mean - fail_with) / (std + eps)
    adv = torch.where(std > 0, adv, torch.zeros_like(adv))   # all equal: no signal
    return _tokens(adv.reshape(-1).to(scores["score"].dtype), rollout)


def _check_pass_at_k(where: str, specs: tuple, attrs: Mapping[str, Any]) -> None:
    g = check_group_size(where, specs, attrs)
    k = attrs.get("k")
    if not isinstance(k, int) or not 1 <= k <= g:
        raise TraceError(f"{where}: k={k!r} must be an int in [1, group_size={g}]")


def _adv_op(name: str, fn: Any, inputs: tuple[str, ...], check: Any) -> OpDef:
    return OpDef(name, fn, inputs, (("advantages", sig.ADVANTAGES, ADV_FIELDS),), check)


_RS = (sig.ROLLOUT, sig.SCORES)
group_advantages = _adv_op("group_advantages", _grpo, _RS, _check_grpo)
rloo = _adv_op("rloo", _rloo, _RS, _check_rloo)
reinforce_pp = _adv_op("reinforce_pp", _reinforce_pp,
                       (sig.ROLLOUT, sig.SCORES, sig.LOGPROBS, sig.LOGPROBS),
                       _check_reinforce_pp)
reinforce_pp_baseline = _adv_op("reinforce_pp_baseline", _reinforce_pp_baseline, _RS,
                                _check_rloo)
remax = _adv_op("remax", _remax, (sig.ROLLOUT, sig.SCORES, sig.SCORES), _check_remax)
pass_at_k = _adv_op("pass_at_k", _pass_at_k, _RS, _check_pass_at_k)

ESTIMATORS: dict[str, OpDef] = {"grpo": group_advantages, "rloo": rloo,
                                "reinforce_pp": reinforce_pp,
                                "reinforce_pp_baseline": reinforce_pp_baseline,
                                "remax": remax, "pass_at_k": pass_at_k}


def estimator(name: str, where: str = "estimator") -> OpDef:
    """The estimator op called `name`, or a TraceError naming the known ones."""
    from .nearest import suggest

    if name not in ESTIMATORS:
        raise TraceError(f"{where}: unknown advantage estimator {name!r}"
                         f"{suggest(name, ESTIMATORS)} (known: {', '.join(ESTIMATORS)})")
    return ESTIMATORS[name]
