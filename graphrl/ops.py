"""Built-in RL ops on payloads: PPO's GAE with a KL penalty, GRPO's group advantages.

Kernels import torch when they run, never at import. Each takes payload dicts (field
name -> tensor) in the order of its `inputs` and returns one dict per output.
"""
from __future__ import annotations

from typing import Any, Callable

from . import signatures as sig
from .trace import OpDef
from .types import Field

ADV_FIELDS = (Field("advantages", "f32"),)
RET_FIELDS = (Field("returns", "f32"),)


def masked_whiten(x: Any, mask: Any, eps: float = 1e-6) -> Any:
    """Normalise x to zero mean, unit variance over the positions where mask is 1."""
    n = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * (var + eps).rsqrt() * mask


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


def _group_advantages(rollout: dict, scores: dict, *, group_size: int,
                      eps: float = 1e-4) -> dict:
    """GRPO's outcome advantage (Shao et al. 2024, DeepSeekMath §4.1.2): each sample's
    score normalised by the mean and std of its group of `group_size` consecutive
    samples of one prompt, broadcast to every response token."""
    s = scores["score"]
    if s.shape[0] % group_size:
        raise ValueError(f"batch {s.shape[0]} is not a multiple of group_size {group_size}")
    g = s.view(-1, group_size)
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)
    return {"advantages": adv.reshape(-1, 1) * rollout["response_mask"]}


gae = OpDef("gae", _gae, (sig.ROLLOUT, sig.SCORES, sig.VALUES, sig.LOGPROBS, sig.LOGPROBS),
            (("advantages", sig.ADVANTAGES, ADV_FIELDS), ("returns", sig.RETURNS, RET_FIELDS)))

def _check_group(attrs: dict, rollout: Any) -> str:
    """group_size: an int >= 1 that divides the rollout's rows (prompts x samples)."""
    size = attrs.get("group_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"group_size={size!r} must be an int >= 1"
    if rollout.batch % size:
        return (f"group_size={size} does not divide the rollout's {rollout.batch} rows "
                "(generate samples=group_size per prompt)")
    return ""


group_advantages = OpDef("group_advantages", _group_advantages, (sig.ROLLOUT, sig.SCORES),
                         (("advantages", sig.ADVANTAGES, ADV_FIELDS),), check=_check_group)


def op(name: str, inputs: tuple[str, ...],
       outputs: tuple[tuple[str, str, tuple[Field, ...]], ...]) -> Callable[[Callable], OpDef]:
    """Decorator turning a tensor function into an op usable in a step."""
    def wrap(fn: Callable) -> OpDef:
        return OpDef(name, fn, tuple(inputs), tuple(outputs))
    return wrap
