"""DAPO's sampling ops (Yu et al. 2025, "DAPO", arXiv 2503.14476): dynamic sampling
(drop the groups whose rewards are all equal), the soft overlong punishment, and
masking truncated completions out of the loss.

Dynamic sampling makes the trained batch smaller than the generated one, and variable.
The step generates an oversampled batch (the prompts input holds 1/keep_fraction times
the prompts the trainer should see); `dynamic_sampling(..., keep_fraction=f)` keeps at
most round(groups * f) groups, and that is the batch its outputs declare: the plan
prices generation (and everything before the filter) on the oversampled batch, and
every call after it on the kept one. The node carries `keep_fraction`, so the IR shows
the factor and a parsed graph lowers to the same plan.

At run time the kept batch varies: when more groups have varied rewards than planned,
the first ones (in batch order) are kept; when fewer, the step trains on fewer (no
regeneration: the batch shrinks, never waits); when none, it keeps the first group
(whose advantages are all zero, so only the loss's KL term acts). Every value computed
from a filtered one has a variable batch of at most the declared size
(`variable_values`); both executors accept that, and split the rows they really hold.
"""
from __future__ import annotations

from typing import Any, Mapping

from . import signatures as sig
from .errors import TraceError
from .estimators import check_group_size, last_token_index
from .trace import OpDef
from .types import Field, PayloadSpec

KEEP_ATTR = "keep_fraction"   # the node attribute that marks a filtering op


def kept_groups(groups: int, keep_fraction: float) -> int:
    """How many groups a filter of `groups` keeps at most (the planned kept batch)."""
    return max(1, round(groups * keep_fraction))


def _dynamic_sampling(rollout: dict, scores: dict, *, group_size: int,
                      keep_fraction: float) -> tuple[dict, dict]:
    """DAPO's dynamic sampling (Yu et al. 2025, §3.2, eq. 11's constraint
    0 < |{o_i : is_equivalent(a, o_i)}| < G): keep the groups whose scores are not all
    equal, at most kept_groups(...) of them, in batch order (module doc)."""
    import torch

    s = scores["score"]
    g = s.view(-1, group_size)
    varied = (g.max(dim=1).values > g.min(dim=1).values).nonzero().flatten()
    cap = kept_groups(g.shape[0], keep_fraction)
    keep = varied[:cap] if varied.numel() else torch.zeros(1, dtype=torch.long,
                                                           device=s.device)
    rows = (keep.unsqueeze(1) * group_size
            + torch.arange(group_size, device=s.device)).flatten()
    return {k: v[rows] for k, v in rollout.items()}, {"score": s[rows]}


def _check_dynamic_sampling(where: str, specs: tuple[PayloadSpec, ...],
                            attrs: Mapping[str, Any]) -> int:
    g = check_group_size(where, specs, attrs)
    f = attrs.get(KEEP_ATTR)
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise TraceError(f"{where}: {KEEP_ATTR}={f!r} must be in (0, 1]: the expected "
                         "share of groups with varied rewards (the prompts input should "
                         f"hold 1/{KEEP_ATTR} times the prompts to train on)")
    if specs[1].batch != specs[0].batch:
        raise TraceError(f"{where}: rollout batch {specs[0].batch} but {specs[1].batch} "
                         "scores")
    return kept_groups(specs[0].batch // g, float(f)) * g


def _overlong_penalty(rollout: dict, scores: dict, *, max_len: int, cache: int,
                      coef: float = 1.0) -> dict:
    """DAPO's soft overlong punishment (Yu et al. 2025, §3.4, eq. 13), added to the score:
    R_length(y) = 0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache if
    L_max - L_cache < |y| <= L_max; -1 if |y| > L_max; times `coef`."""
    import torch

    length = rollout["response_mask"].sum(dim=1)
    soft = max_len - cache
    penalty = torch.where(length <= soft, torch.zeros_like(length), (soft - length) / cache)
    penalty = torch.where(length > max_len, -torch.ones_like(length), penalty)
    return {"score": scores["score"] + coef * penalty.to(scores["score"].dtype)}


def _check_overlong(where: str, specs: tuple, attrs: Mapping[str, Any]) -> None:
    m, c = attrs.get("max_len"), attrs.get("cache")
    if not isinstance(m, int) or not isinstance(c, int) or not 0 < c <= m:
        raise TraceError(f"{where}: needs ints 0 < cache <= max_len, got max_len={m!r}, "
                         f"cache={c!r} (the last `cache` tokens before max_len are "
                         "penalised linearly)")


def _mask_truncated(rollout: dict, *, max_new_tokens: int, eos_id: int = -1) -> dict:
    """DAPO's overlong filtering (Yu et al. 2025, §3.4): a truncated completion (it used
    all max_new_tokens and its last token is not eos_id; eos_id -1: every full-length
    one) is masked out of the loss: its response_mask becomes 0."""
    import torch

    mask = rollout["response_mask"]
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = rollout["tokens"][rows, last_token_index(mask)]
    truncated = (mask.sum(dim=1) >= max_new_tokens) & (last != eos_id)
    return {**rollout, "response_mask": mask * (~truncated).to(mask.dtype).unsqueeze(1)}


def _check_mask_truncated(where: str, specs: tuple, attrs: Mapping[str, Any]) -> None:
    n = attrs.get("max_new_tokens")
    if not isinstance(n, int) or n < 1:
        raise TraceError(f"{where}: max_new_tokens={n!r} must be the generate call's "
                         "int >= 1")


_SCORE = (Field("score", "f32", per_token=False),)
dynamic_sampling = OpDef("dynamic_sampling", _dynamic_sampling, (sig.ROLLOUT, sig.SCORES),
                         (("kept_rollout", sig.ROLLOUT, sig.ROLLOUT_FIELDS),
                          ("kept_scores", sig.SCORES, _SCORE)), _check_dynamic_sampling)
overlong_penalty = OpDef("overlong_penalty", _overlong_penalty, (sig.ROLLOUT, sig.SCORES),
                         (("scores", sig.SCORES, _SCORE),), _check_overlong)
mask_truncated = OpDef("mask_truncated", _mask_truncated, (sig.ROLLOUT,),
                       (("rollout", sig.ROLLOUT, sig.ROLLOUT_FIELDS),), _check_mask_truncated)


def variable_values(graph: Any) -> dict[str, int]:
    """The values whose batch may be smaller than declared at run time (the outputs of
    filtering ops, nodes with keep_fraction, and every data value computed from one),
    each with the unit its batch is a multiple of (the filter's group_size)."""
    out: dict[str, int] = {}
    for n in graph.nodes:
        units = [out[i] for i in n.inputs if i in out]
        if n.attr(KEEP_ATTR) is not None:
            units.append(int(n.attr("group_size", 1)))
        if units:
            out.update((v.name, max(units)) for v in n.outputs if not v.spec.is_weights)
    return out




def oversampling_lines(graph: Any) -> list[str]:
    """One line per filtering op: how much more the step generates than it trains on."""
    out = []
    for n in graph.nodes:
        f = n.attr(KEEP_ATTR)
        if f is None:
            continue
        src, kept = graph.value(n.inputs[0]).spec.batch, n.outputs[0].spec.batch
        out.append(f"{n.target} {n.name}: generates {src} rows, trains on at most {kept} "
                   f"(keep_fraction {f}: oversampled x{src / kept:.2f}); the plan prices "
                   "each call on its own batch")
    return out
