"""The built-in losses, declared with @loss as a user's are (graphrl/loss_def.py).

Token-level terms count response tokens only (`response_mask`): padding after a
sequence's EOS and the prompt contribute nothing. PPO and GRPO without `old_logprobs`
(on-policy: one optimizer pass over the rollout) use the new log-probs, detached, as the
old ones: ratio 1, the same gradient (as TRL's GRPOTrainer with num_iterations=1).

Policy losses' options (docs/algorithms.md lists them with TRL's and verl's names):
  clip=0.2 or clip=(low, high)  PPO's clip range; (low, high) DAPO's clip-higher
  dual_clip=c (c > 1; 0 off)    dual-clip PPO's lower bound c A for A < 0
  ratio="token" | "sequence"    GSPO's sequence-level importance ratio
  aggregation="token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum"
              | "seq-mean-token-sum-norm"  (norm_length: its constant L; 0 = response width)
  kl_coef, kl_estimator="k1" | "k2" | "k3"   (grpo: the KL-to-reference term in the loss)
  kl_control="fixed" | "adaptive", kl_target, kl_gain   (grpo: "adaptive" makes kl_coef
                                the initial value of a coefficient the trained model's
                                engine keeps and updates once per train call from the
                                call's measured KL, Ziegler et al. 2019, §2.2:
                                beta <- beta (1 + kl_gain clip(KL / kl_target - 1, ±0.2)))
  entropy_coef=c                minus c times the token entropy (engines giving
                                `forward.with_entropy`: hf, fast, deepspeed, FSDP)
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping

from . import loss_math as lm
from . import signatures as sig
from .loss_def import LossDef, loss

Forward = Callable[[Any], Any]
MB = Mapping[str, Mapping[str, Any]]

PG_OPTIONS = {"clip": 0.2, "clip_high": None, "dual_clip": 0.0, "ratio": "token",
              "aggregation": "token-mean", "norm_length": 0.0, "entropy_coef": 0.0}
KL_OPTIONS = {"kl_coef": 0.04, "kl_estimator": "k3", "kl_control": "fixed",
              "kl_target": 0.1, "kl_gain": 0.1}
KL_CONTROLS = ("fixed", "adaptive")


def forward_each(forward: Forward, *payloads: Any) -> list[Any]:
    """The head quantity of each payload: one forward over all of them where the engine
    offers it (`forward.many`, payloads of one width), else one call each."""
    many = getattr(forward, "many", None)
    return list(many(payloads)) if many is not None else [forward(p) for p in payloads]


def token_inputs(forward: Forward, mb: MB, *names: str, entropy: bool = False) -> tuple:
    """(mask, the forward's per-token output, then each named input's per-token field,
    then with `entropy` the token entropies), every one exactly 0 at masked positions
    (loss_math.masked): whatever a prompt or padding position holds (inf, NaN, a
    log-ratio whose exp overflows) reaches neither the loss nor its gradient, through
    any nonlinearity."""
    mask = mb["rollout"]["response_mask"]
    fields = {"old_logprobs": "logprobs", "ref_logprobs": "logprobs",
              "behaviour_logprobs": "logprobs", "advantages": "advantages",
              "old_values": "values", "returns": "returns"}
    if entropy:
        both = getattr(forward, "with_entropy", None)
        if both is None:
            raise ValueError("entropy_coef needs the token entropies of the engine's "
                             "forward (forward.with_entropy: engines hf, fast, deepspeed "
                             "and FSDP give them; megatron does not)")
        new, ent = both(mb["rollout"])
    else:
        new, ent = forward(mb["rollout"]), None
    out = [lm.masked(new, mask)]
    for name in names:
        p = mb.get(name)
        out.append(None if p is None else lm.masked(p[fields[name]], mask))
    if entropy:
        out.append(lm.masked(ent, mask))
    return (mask, *out)


def entropy_bonus(value: Any, entropy: Any, mask: Any, o: Mapping[str, Any]) -> Any:
    """The loss minus entropy_coef times the token entropy, aggregated as the surrogate
    is (the entropy bonus c2 S of PPO's objective, Schulman et al. 2017, eq. 9)."""
    if entropy is None:
        return value
    return value - o["entropy_coef"] * lm.aggregate(entropy, mask, o["aggregation"],
                                                    float(o["norm_length"]))


def clip_bounds(o: Mapping[str, Any]) -> tuple[float, float]:
    """(low, high) of the clip range: clip_high None means the same as clip."""
    low = float(o["clip"])
    return low, (low if o["clip_high"] is None else float(o["clip_high"]))


def split_clip(options: dict[str, Any]) -> dict[str, Any]:
    """clip=(low, high) as the node attributes clip=low, clip_high=high (attributes are
    scalars; the text form stays that of a symmetric clip when low == high)."""
    clip = options.get("clip")
    if isinstance(clip, (tuple, list)) and len(clip) == 2:
        out = dict(options, clip=clip[0])
        if clip[1] != clip[0]:
            out["clip_high"] = clip[1]
        return out
    return options


def check_pg(o: Mapping[str, Any]) -> str | None:
    """The contradictions a policy loss refuses (None when the options are fine)."""
    low, high = clip_bounds(o)
    if not 0 <= low < 1:
        return f"clip={low!r}: the clip range's low side must be in [0, 1)"
    if high < low:
        return (f"clip=({low}, {high}): the high side of the clip range is below the low "
                "side (clip-higher wants high >= low)")
    if o["dual_clip"] and o["dual_clip"] <= 1:
        return f"dual_clip={o['dual_clip']!r} must be > 1 (0 turns it off)"
    if o["aggregation"] not in lm.AGGREGATIONS:
        return (f"aggregation={o['aggregation']!r} (known: {', '.join(lm.AGGREGATIONS)})")
    if o["ratio"] not in lm.RATIO_LEVELS:
        return f"ratio={o['ratio']!r} (known: {', '.join(lm.RATIO_LEVELS)})"
    if o.get("kl_estimator", "k3") not in lm.KL_ESTIMATORS:
        return (f"kl_estimator={o['kl_estimator']!r} (known: "
                f"{', '.join(lm.KL_ESTIMATORS)})")
    return check_kl_control(o)


def check_kl_control(o: Mapping[str, Any]) -> str | None:
    """kl_control's contradictions (None when fine or when the loss has no KL term)."""
    control = o.get("kl_control", "fixed")
    if control not in KL_CONTROLS:
        return f"kl_control={control!r} (known: {', '.join(KL_CONTROLS)})"
    if control == "fixed":
        return None
    if not float(o["kl_coef"]) > 0:
        return (f"kl_control='adaptive' needs a KL term: kl_coef={o['kl_coef']!r} is the "
                "initial coefficient and must be > 0")
    if not float(o["kl_target"]) > 0:
        return f"kl_control='adaptive': kl_target={o['kl_target']!r} must be > 0"
    if not 0 < float(o["kl_gain"]) <= 1:
        return f"kl_control='adaptive': kl_gain={o['kl_gain']!r} must be in (0, 1]"
    return None


def pg_weight(o: Mapping[str, Any]) -> str:
    return lm.AGGREGATIONS.get(o["aggregation"], "tokens")


def pg_surrogate(new_lp: Any, old_lp: Any, adv: Any, mask: Any,
                 o: Mapping[str, Any]) -> tuple[Any, Any]:
    """(loss, clip fraction) of the clipped policy-gradient surrogate with the options
    `o` (loss_math.clipped_objective, log_ratio, aggregate); old_lp None: on-policy, the
    new log-probs detached."""
    import torch

    low, high = clip_bounds(o)
    old_lp = new_lp.detach() if old_lp is None else old_lp
    ratio = torch.exp(lm.log_ratio(new_lp, old_lp, mask, o["ratio"]))
    obj = lm.clipped_objective(ratio, adv, low, high, float(o["dual_clip"]))
    loss_value = -lm.aggregate(obj, mask, o["aggregation"], float(o["norm_length"]))
    return loss_value, lm.clip_fraction(ratio, mask, low, high)


def kl_term(new_lp: Any, ref_lp: Any, mask: Any, o: Mapping[str, Any]) -> Any:
    """The KL-to-reference term, aggregated as the surrogate is."""
    per_token = lm.kl_estimate(new_lp, ref_lp, o["kl_estimator"])
    return lm.aggregate(per_token, mask, o["aggregation"], float(o["norm_length"]))


@loss("ppo", inputs=(("rollout", sig.ROLLOUT), ("old_logprobs", sig.LOGPROBS),
                     ("advantages", sig.ADVANTAGES)),
      stats=("loss", "clip_fraction", "approx_kl"), options=PG_OPTIONS,
      optional=("old_logprobs",), weight=pg_weight, check=check_pg,
      prepare=split_clip)
def ppo(forward: Forward, mb: MB, **o: Any) -> tuple[Any, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) and its variants (options)."""
    mask, new_lp, old, adv, *ent = token_inputs(forward, mb, "old_logprobs", "advantages",
                                                entropy=o["entropy_coef"] > 0)
    old_lp = new_lp.detach() if old is None else old
    value, clip_frac = pg_surrogate(new_lp, old_lp, adv, mask, o)
    value = entropy_bonus(value, ent[0] if ent else None, mask, o)
    approx_kl = lm.masked_mean(old_lp - new_lp.detach(), mask)
    return value, {"loss": value.item(), "clip_fraction": clip_frac.item(),
                   "approx_kl": approx_kl.item()}


@loss("grpo", inputs=(("rollout", sig.ROLLOUT), ("old_logprobs", sig.LOGPROBS),
                      ("ref_logprobs", sig.LOGPROBS), ("advantages", sig.ADVANTAGES)),
      stats=("loss", "clip_fraction", "kl", "kl_coef"), options={**PG_OPTIONS, **KL_OPTIONS},
      optional=("old_logprobs",), weight=pg_weight, check=check_pg,
      prepare=split_clip)
def grpo(forward: Forward, mb: MB, **o: Any) -> tuple[Any, dict[str, float]]:
    """GRPO (Shao et al. 2024, eq. 3): the clipped surrogate plus kl_coef times a KL
    estimator to the reference (k3 by default); with options, DAPO's, Dr. GRPO's and
    GSPO's variants (docs/algorithms.md)."""
    mask, new_lp, old, ref, adv, *ent = token_inputs(
        forward, mb, "old_logprobs", "ref_logprobs", "advantages",
        entropy=o["entropy_coef"] > 0)
    surrogate, clip_frac = pg_surrogate(new_lp, old, adv, mask, o)
    kl = kl_term(new_lp, ref, mask, o)
    value = entropy_bonus(surrogate + o["kl_coef"] * kl, ent[0] if ent else None, mask, o)
    # kl_coef: the coefficient used (with kl_control="adaptive" the engine's, kl_control.py)
    return value, {"loss": value.item(), "clip_fraction": clip_frac.item(), "kl": kl.item(),
                   "kl_coef": float(o["kl_coef"])}


def _decoupled_surrogate(new_lp: Any, prox_lp: Any, behav_lp: Any, adv: Any, mask: Any,
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

    raw = torch.exp(prox_lp - behav_lp)
    weight = torch.clamp(raw, max=behaviour_clip)
    ratio = torch.exp(new_lp - prox_lp)
    per_token = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv)
    loss_value = -lm.masked_mean(weight * per_token, mask)
    stats = {"clip_fraction": lm.clip_fraction(ratio, mask, clip, clip).item(),
             "behaviour_weight": lm.masked_mean(weight, mask).item(),
             "behaviour_clip_fraction": lm.masked_mean((raw > behaviour_clip).float(),
                                                       mask).item()}
    return loss_value, stats


DECOUPLED_INPUTS = (("behaviour_logprobs", sig.LOGPROBS), ("advantages", sig.ADVANTAGES),
                    ("versions", sig.VERSIONS))
DECOUPLED_STATS = ("behaviour_weight", "behaviour_clip_fraction")


@loss("ppo_decoupled",
      inputs=(("rollout", sig.ROLLOUT), ("old_logprobs", sig.LOGPROBS), *DECOUPLED_INPUTS),
      stats=("loss", "clip_fraction", "approx_kl", *DECOUPLED_STATS),
      options={"clip": 0.2, "behaviour_clip": 2.0})
def ppo_decoupled(forward: Forward, mb: MB, *, clip: float,
                  behaviour_clip: float) -> tuple[Any, dict[str, float]]:
    """PPO on stale rollouts: the decoupled objective (see _decoupled_surrogate)."""
    mask, new_lp, prox, behav, adv = token_inputs(forward, mb, "old_logprobs",
                                                  "behaviour_logprobs", "advantages")
    value, stats = _decoupled_surrogate(new_lp, prox, behav, adv, mask, clip, behaviour_clip)
    approx_kl = lm.masked_mean(prox - new_lp.detach(), mask)
    return value, {"loss": value.item(), "approx_kl": approx_kl.item(), **stats}


@loss("grpo_decoupled",
      inputs=(("rollout", sig.ROLLOUT), ("old_logprobs", sig.LOGPROBS),
              ("ref_logprobs", sig.LOGPROBS), *DECOUPLED_INPUTS),
      stats=("loss", "clip_fraction", "kl", *DECOUPLED_STATS),
      options={"clip": 0.2, "kl_coef": 0.04, "behaviour_clip": 2.0})
def grpo_decoupled(forward: Forward, mb: MB, *, clip: float, kl_coef: float,
                   behaviour_clip: float) -> tuple[Any, dict[str, float]]:
    """GRPO on stale rollouts: the decoupled surrogate (see _decoupled_surrogate) plus
    kl_coef times the k3 KL estimator to the reference, as in grpo."""
    mask, new_lp, prox, ref, behav, adv = token_inputs(
        forward, mb, "old_logprobs", "ref_logprobs", "behaviour_logprobs", "advantages")
    surrogate, stats = _decoupled_surrogate(new_lp, prox, behav, adv, mask, clip,
                                            behaviour_clip)
    kl = lm.masked_mean(lm.kl_estimate(new_lp, ref, "k3"), mask)
    value = surrogate + kl_coef * kl
    return value, {"loss": value.item(), "kl": kl.item(), **stats}


@loss("value", inputs=(("rollout", sig.ROLLOUT), ("old_values", sig.VALUES),
                       ("returns", sig.RETURNS)),
      stats=("loss", "value_clip_fraction"), options={"value_clip": 0.2})
def value(forward: Forward, mb: MB, *, value_clip: float) -> tuple[Any, dict[str, float]]:
    """Clipped value loss (as in OpenAI baselines' PPO2): 0.5 * max of the squared errors
    of the new value and of the old value moved by at most value_clip."""
    import torch

    mask, new_v, old_v, ret = token_inputs(forward, mb, "old_values", "returns")
    clipped = old_v + torch.clamp(new_v - old_v, -value_clip, value_clip)
    err = torch.maximum((new_v - ret) ** 2, (clipped - ret) ** 2)
    loss_value = 0.5 * lm.masked_mean(err, mask)
    frac = lm.masked_mean(((new_v - old_v).abs() > value_clip).float(), mask)
    return loss_value, {"loss": loss_value.item(), "value_clip_fraction": frac.item()}


@loss("bradley_terry", inputs=(("chosen", sig.ROLLOUT), ("rejected", sig.ROLLOUT)),
      stats=("loss", "accuracy"), weight="rows")
def bradley_terry(forward: Forward, mb: MB) -> tuple[Any, dict[str, float]]:
    """Reward-model loss on preference pairs: -log sigmoid(r(chosen) - r(rejected))
    (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1)."""
    import torch.nn.functional as F

    chosen, rejected = forward_each(forward, mb["chosen"], mb["rejected"])
    margin = chosen - rejected
    loss_value = -F.logsigmoid(margin).mean()
    return loss_value, {"loss": loss_value.item(),
                        "accuracy": (margin > 0).float().mean().item()}


# read-only: a step adds its own losses by passing them (the Program carries them)
BUILTIN: Mapping[str, LossDef] = MappingProxyType({
    d.name: d for d in (ppo, grpo, value, bradley_terry, ppo_decoupled, grpo_decoupled)})
# loss -> its staleness-corrected form (passes/staleness.py)
DECOUPLED: Mapping[str, str] = MappingProxyType({"ppo": "ppo_decoupled",
                                                 "grpo": "grpo_decoupled"})

__all__ = ["BUILTIN", "DECOUPLED", "forward_each", "token_inputs", "entropy_bonus",
           "pg_surrogate", "kl_term", "check_kl_control", "KL_CONTROLS",
           "clip_bounds", "split_clip", "check_pg", "ppo", "grpo", "value", "bradley_terry",
           "ppo_decoupled", "grpo_decoupled"]
