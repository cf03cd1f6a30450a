"""Training losses an engine optimises, by the name a train node carries.

Each loss takes `forward(payload) -> tensor` (the model's head quantity with gradients for
a payload's tokens and attention mask: per-token log-probs, per-token values or
per-sequence scores), the minibatch's named payloads and hyper-parameters, and returns
(loss tensor, stats dict of floats). Token-level terms count response tokens only
(`response_mask`): padding after a sequence's EOS contributes nothing. PPO and GRPO
without `old_logprobs` (on-policy: one optimizer pass over the rollout) use the new
log-probs, detached, as the old ones: ratio 1, the same gradient (signatures.OPTIONAL_INPUTS).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

Forward = Callable[[Any], Any]


def masked_mean(x: Any, mask: Any) -> Any:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _clipped_surrogate(new_lp: Any, old_lp: Any, adv: Any, mask: Any, clip: float) -> tuple:
    """PPO's clipped surrogate objective (Schulman et al. 2017, eq. 7), token level."""
    import torch

    ratio = torch.exp(new_lp - old_lp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clip_frac = masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
    return loss, clip_frac


def forward_each(forward: Forward, *payloads: Any) -> list[Any]:
    """The head quantity of each payload: one forward over all of them where the engine
    offers it (`forward.many`, payloads of one width), else one call each."""
    many = getattr(forward, "many", None)
    return list(many(payloads)) if many is not None else [forward(p) for p in payloads]


def old_logprobs(mb: Mapping[str, Mapping[str, Any]], new_lp: Any) -> Any:
    """The old log-probs of the ratio: the given ones, or on-policy the new ones detached."""
    old = mb.get("old_logprobs")
    return new_lp.detach() if old is None else old["logprobs"]


def ppo(forward: Forward, mb: Mapping[str, Mapping[str, Any]], *, clip: float = 0.2,
        **_: Any) -> tuple[Any, dict[str, float]]:
    r = mb["rollout"]
    mask = r["response_mask"]
    new_lp = forward(r)
    old_lp = old_logprobs(mb, new_lp)
    loss, clip_frac = _clipped_surrogate(new_lp, old_lp, mb["advantages"]["advantages"],
                                         mask, clip)
    approx_kl = masked_mean(old_lp - new_lp.detach(), mask)
    return loss, {"loss": loss.item(), "clip_fraction": clip_frac.item(),
                  "approx_kl": approx_kl.item()}


def grpo(forward: Forward, mb: Mapping[str, Mapping[str, Any]], *, clip: float = 0.2,
         kl_coef: float = 0.04, **_: Any) -> tuple[Any, dict[str, float]]:
    """GRPO (Shao et al. 2024, eq. 3): clipped surrogate plus kl_coef times the k3 KL
    estimator to the reference, exp(ref - new) - (ref - new) - 1 (Schulman 2020)."""
    import torch

    r = mb["rollout"]
    mask = r["response_mask"]
    new_lp = forward(r)
    surrogate, clip_frac = _clipped_surrogate(new_lp, old_logprobs(mb, new_lp),
                                              mb["advantages"]["advantages"], mask, clip)
    diff = mb["ref_logprobs"]["logprobs"] - new_lp
    kl = masked_mean(torch.exp(diff) - diff - 1.0, mask)
    loss = surrogate + kl_coef * kl
    return loss, {"loss": loss.item(), "clip_fraction": clip_frac.item(), "kl": kl.item()}


def _decoupled_surrogate(new_lp: Any, mb: Mapping[str, Mapping[str, Any]], mask: Any,
                         clip: float, behaviour_clip: float) -> tuple:
    """AReaL's decoupled PPO objective (Fu et al. 2025, "AReaL", arXiv 2505.24298, §5.2,
    eq. 5): the clipped surrogate is taken against the *proximal* policy (old_logprobs:
    the weights the trainer holds at this step) and each token is weighted by
    pi_prox / pi_behav, the importance ratio of the proximal policy to the *behaviour*
    policy whose (stale) weights generated the token. The weight is truncated at
    `behaviour_clip`, as IMPALA's V-trace truncates its importance ratios (Espeholt et al.
    2018, eq. 1) and AReaL caps its behaviour weight. With no staleness (behaviour ==
    proximal) the weight is 1 and this is PPO's clipped surrogate."""
    import torch

    prox_lp = mb["old_logprobs"]["logprobs"]
    raw = torch.exp(prox_lp - mb["behaviour_logprobs"]["logprobs"])
    weight = torch.clamp(raw, max=behaviour_clip)
    ratio = torch.exp(new_lp - prox_lp)
    adv = mb["advantages"]["advantages"]
    per_token = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv)
    loss = -masked_mean(weight * per_token, mask)
    stats = {"clip_fraction": masked_mean(((ratio - 1.0).abs() > clip).float(), mask).item(),
             "behaviour_weight": masked_mean(weight, mask).item(),
             "behaviour_clip_fraction": masked_mean((raw > behaviour_clip).float(),
                                                    mask).item()}
    return loss, stats


def ppo_decoupled(forward: Forward, mb: Mapping[str, Mapping[str, Any]], *,
                  clip: float = 0.2, behaviour_clip: float = 2.0,
                  **_: Any) -> tuple[Any, dict[str, float]]:
    """PPO on stale rollouts: the decoupled objective (see _decoupled_surrogate)."""
    r = mb["rollout"]
    mask = r["response_mask"]
    new_lp = forward(r)
    loss, stats = _decoupled_surrogate(new_lp, mb, mask, clip, behaviour_clip)
    approx_kl = masked_mean(mb["old_logprobs"]["logprobs"] - new_lp.detach(), mask)
    return loss, {"loss": loss.item(), "approx_kl": approx_kl.item(), **stats}


def grpo_decoupled(forward: Forward, mb: Mapping[str, Mapping[str, Any]], *,
                   clip: float = 0.2, kl_coef: float = 0.04, behaviour_clip: float = 2.0,
                   **_: Any) -> tuple[Any, dict[str, float]]:
    """GRPO on stale rollouts: the decoupled surrogate (see _decoupled_surrogate) plus
    kl_coef times the k3 KL estimator to the reference, as in grpo."""
    import torch

    r = mb["rollout"]
    mask = r["response_mask"]
    new_lp = forward(r)
    surrogate, stats = _decoupled_surrogate(new_lp, mb, mask, clip, behaviour_clip)
    diff = mb["ref_logprobs"]["logprobs"] - new_lp
    kl = masked_mean(torch.exp(diff) - diff - 1.0, mask)
    loss = surrogate + kl_coef * kl
    return loss, {"loss": loss.item(), "kl": kl.item(), **stats}


def value(forward: Forward, mb: Mapping[str, Mapping[str, Any]], *, value_clip: float = 0.2,
          **_: Any) -> tuple[Any, dict[str, float]]:
    """Clipped value loss (as in OpenAI baselines' PPO2): 0.5 * max of the squared errors
    of the new value and of the old value moved by at most value_clip."""
    import torch

    r = mb["rollout"]
    mask = r["response_mask"]
    new_v = forward(r)
    old_v, ret = mb["old_values"]["values"], mb["returns"]["returns"]
    clipped = old_v + torch.clamp(new_v - old_v, -value_clip, value_clip)
    err = torch.maximum((new_v - ret) ** 2, (clipped - ret) ** 2)
    loss = 0.5 * masked_mean(err, mask)
    frac = masked_mean(((new_v - old_v).abs() > value_clip).float(), mask)
    return loss, {"loss": loss.item(), "value_clip_fraction": frac.item()}


def bradley_terry(forward: Forward, mb: Mapping[str, Mapping[str, Any]],
                  **_: Any) -> tuple[Any, dict[str, float]]:
    """Reward-model loss on preference pairs: -log sigmoid(r(chosen) - r(rejected))
    (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1)."""
    import torch.nn.functional as F

    chosen, rejected = forward_each(forward, mb["chosen"], mb["rejected"])
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"loss": loss.item(), "accuracy": (margin > 0).float().mean().item()}


LOSS_FUNCTIONS = {"ppo": ppo, "grpo": grpo, "value": value, "bradley_terry": bradley_terry,
                  "ppo_decoupled": ppo_decoupled, "grpo_decoupled": grpo_decoupled}
