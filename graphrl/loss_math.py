"""The tensor terms policy-gradient losses are built from, each with its source.

Masked reductions select with `torch.where`, never multiply by the mask: a masked
position's value (padding, prompt tokens, a log-ratio of 100 whose exp is inf in fp32)
never reaches the result or its gradient. Functions import torch when they run.
"""
from __future__ import annotations

from typing import Any

# loss aggregation modes (verl's names; docs/algorithms.md maps TRL's onto them) -> the
# measure a micro-batch's share of the minibatch's loss is weighted by (loss_def.WEIGHTS)
AGGREGATIONS = {"token-mean": "tokens", "seq-mean-token-mean": "rows",
                "seq-mean-token-sum": "rows", "seq-mean-token-sum-norm": "rows"}
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")


def masked(x: Any, mask: Any) -> Any:
    """x where mask is set, exactly 0 elsewhere (whatever x holds there, inf and NaN too;
    the gradient to the masked positions is 0)."""
    import torch

    return torch.where(mask > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Any, mask: Any, dim: int | None = None) -> Any:
    return masked(x, mask).sum() if dim is None else masked(x, mask).sum(dim=dim)


def masked_mean(x: Any, mask: Any) -> Any:
    """The mean of x over the positions where mask is set (0 when there are none)."""
    return masked_sum(x, mask) / mask.sum().clamp(min=1.0)


def response_width(mask: Any) -> int:
    """The columns a response may occupy: from the first column any row's response starts
    at to the end (prompts are left-padded to one width, so every response starts there
    and this is generate's max_new_tokens; the same in every micro-batch of a batch)."""
    cols = (mask > 0).any(dim=0).nonzero()
    return int(mask.shape[1] - cols[0]) if cols.numel() else int(mask.shape[1])


def aggregate(per_token: Any, mask: Any, mode: str, norm_length: float = 0.0) -> Any:
    """Reduce a [batch, seq] per-token loss to a scalar (verl's loss_agg_mode names):

    token-mean              sum_i,t l_it / sum_i |o_i|   (DAPO, Yu et al. 2025, eq. 8)
    seq-mean-token-mean     1/B sum_i (1/|o_i|) sum_t l_it   (GRPO, Shao et al. 2024, eq. 3)
    seq-mean-token-sum      1/B sum_i sum_t l_it
    seq-mean-token-sum-norm 1/B sum_i sum_t l_it / L   (Dr. GRPO, Liu et al. 2025, §3.1:
                            a constant L instead of |o_i|; L = norm_length, or when 0 the
                            response width, i.e. generate's max_new_tokens)

    B counts the rows (sequences), |o_i| row i's response tokens. Each is a mean over
    the tokens (token-mean) or the rows (the others) of the batch, so a batch split into
    parts weighted by their tokens or rows (AGGREGATIONS) sums to the whole batch's loss.
    """
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    per_seq = masked_sum(per_token, mask, dim=1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(dim=1).clamp(min=1.0)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = per_seq / float(norm_length or response_width(mask))
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown aggregation {mode!r} (known: {', '.join(AGGREGATIONS)})")
    return per_seq.mean()


def log_ratio(new_lp: Any, old_lp: Any, mask: Any, level: str = "token") -> Any:
    """log(pi_new / pi_old) per token, 0 at masked positions. level "sequence": GSPO's
    length-normalised sequence log-ratio (Zheng et al. 2025, eq. 7)
    log s_i = (1/|o_i|) sum_t log(pi_new(o_it) / pi_old(o_it)), the same at every token
    of row i (its gradient flows to every token of the row)."""
    lr = masked(new_lp - old_lp, mask)
    if level == "token":
        return lr
    if level != "sequence":
        raise ValueError(f"unknown ratio level {level!r} (known: {', '.join(RATIO_LEVELS)})")
    seq = lr.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return masked(seq.expand_as(lr), mask)


def clipped_objective(ratio: Any, adv: Any, low: float, high: float,
                      dual_clip: float = 0.0) -> Any:
    """Per token, the clipped surrogate to maximise (PPO, Schulman et al. 2017, eq. 7),
    min(r A, clip(r, 1 - low, 1 + high) A), with DAPO's decoupled bounds ("clip-higher",
    Yu et al. 2025, eq. 10: high > low); with dual_clip = c > 1, for A < 0 also bounded
    below by c A (dual-clip PPO, Ye et al. 2020, eq. 5: max(min(r A, clip(r) A), c A))."""
    import torch

    obj = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv)
    if dual_clip:
        obj = torch.where(adv < 0, torch.maximum(obj, dual_clip * adv), obj)
    return obj


def clip_fraction(ratio: Any, mask: Any, low: float, high: float) -> Any:
    """The share of response tokens whose ratio lies outside [1 - low, 1 + high]."""
    x = ratio - 1.0
    outside = x.abs() > low if low == high else (x > high) | (-x > low)
    return masked_mean(outside.float(), mask)


def kl_estimate(new_lp: Any, ref_lp: Any, estimator: str = "k3") -> Any:
    """Per-token estimate of KL(pi_new || pi_ref) from tokens sampled from pi_new, with
    log r = log pi_ref - log pi_new (Schulman 2020, "Approximating KL divergence"):
    k1 = -log r (unbiased, high variance), k2 = (log r)^2 / 2 (biased, low variance),
    k3 = (r - 1) - log r (unbiased, low variance, >= 0; GRPO's, Shao et al. 2024, eq. 4)."""
    import torch

    diff = ref_lp - new_lp
    if estimator == "k1":
        return -diff
    if estimator == "k2":
        return 0.5 * diff * diff
    if estimator == "k3":
        return torch.exp(diff) - diff - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r} (known: {', '.join(KL_ESTIMATORS)})")


def adaptive_kl_coef(coef: float, observed_kl: float, target: float, horizon: float,
                     steps: int) -> float:
    """Ziegler et al. 2019 ("Fine-tuning language models from human preferences",
    §2.2): beta <- beta (1 + K_beta e), e = clip((KL - target) / target, -0.2, 0.2),
    K_beta = steps / horizon (steps: samples since the last update)."""
    return kl_controller_step(coef, observed_kl, target, steps / horizon)


def kl_controller_step(coef: float, observed_kl: float, target: float, gain: float) -> float:
    """One update of Ziegler et al. 2019's adaptive KL coefficient (§2.2) with the gain
    K_beta given directly: beta (1 + K_beta clip(KL / target - 1, -0.2, 0.2))."""
    err = min(max((observed_kl - target) / target, -0.2), 0.2)
    return coef * (1.0 + gain * err)


__all__ = ["AGGREGATIONS", "KL_ESTIMATORS", "RATIO_LEVELS", "masked", "masked_sum",
           "masked_mean", "response_width", "aggregate", "log_ratio", "clipped_objective",
           "clip_fraction", "kl_estimate", "adaptive_kl_coef",
           "kl_controller_step"]
