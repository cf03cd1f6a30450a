"""Built-in RL ops on payloads: PPO's GAE with a KL penalty; the advantage estimators
(graphrl/estimators.py: GRPO's group advantages, RLOO, REINFORCE++, ReMax, pass@k); DAPO's
sampling ops (graphrl/sampling.py: dynamic sampling, overlong penalty and masking).

Kernels import torch when they run, never at import. Each takes payload dicts (field
name -> tensor) in the order of its `inputs` and returns one dict per output.
"""
from __future__ import annotations

from typing import Callable

from . import signatures as sig
from .estimators import (ADV_FIELDS, ESTIMATORS, SCALES, estimator,  # noqa: F401
                         group_advantages, masked_whiten, pass_at_k, reinforce_pp,
                         reinforce_pp_baseline, remax, rloo)
from .sampling import dynamic_sampling, mask_truncated, overlong_penalty  # noqa: F401
from .trace import OpDef
from .types import Field

RET_FIELDS = (Field("returns", "f32"),)


def _gae(rollout: dict, scores: dict, values: dict, logprobs: dict, ref_logprobs: dict, *,
         gamma: float = 1.0, lam: float = 0.95, kl_coef: float = 0.05,
         whiten: bool = True) -> tuple[dict, dict]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) on the response
    tokens, with the per-token reward of InstructGPT (Ouyang et al. 2022, eq. 2):
    r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t)), plus the score at the last token."""
    import torch

    mask = rollout["response_mask"]
    kl = (logprobs["logprobs"] - ref_logprobs["logprobs"]) * mask
    rewards = -kl_coef * kl
    last = mask.shape[1] - 1 - torch.flip(mask, [1]).argmax(dim=1)  # last response index
    rewards[torch.arange(mask.shape[0]), last] += scores["score"]
    v = values["values"] * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(mask.shape[1] - 1, -1, -1):
        next_v = v[:, t + 1] if t + 1 < mask.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - v[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    returns = (adv + v) * mask
    if whiten:
        adv = masked_whiten(adv, mask)
    return {"advantages": adv}, {"returns": returns}


gae = OpDef("gae", _gae, (sig.ROLLOUT, sig.SCORES, sig.VALUES, sig.LOGPROBS, sig.LOGPROBS),
            (("advantages", sig.ADVANTAGES, ADV_FIELDS), ("returns", sig.RETURNS, RET_FIELDS)))


def op(name: str, inputs: tuple[str, ...],
       outputs: tuple[tuple[str, str, tuple[Field, ...]], ...]) -> Callable[[Callable], OpDef]:
    """Decorator turning a tensor function into an op usable in a step."""
    def wrap(fn: Callable) -> OpDef:
        return OpDef(name, fn, tuple(inputs), tuple(outputs))
    return wrap
