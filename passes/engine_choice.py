"""The engine dimension of the placement search (search.py).

A model's forward and train calls share one engine (graphrl.engines), so one strategy:
its leading call (its train call, else its first forward call) chooses for all of them,
priced together with the others, which run `graphrl.engines.shared_strategy` of it; a
call with pinned strategy fields keeps its own (running it is then refused by name).
For a model whose engine nobody fixed (placement `engine:`, or a model declared with an
engine other than hf/fast) each candidate strategy is tried on every engine that
executes it (hf, deepspeed, megatron, in that order, so ties go to the earlier), its
seconds divided by the engine's measured efficiency (graphrl.engine_cost); the choice
is `Strategy.engine` in the plan ("" = hf). Generate calls keep their own engine.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from graphrl.architecture import ENGINE_FEATURES
from graphrl.engines import AUTO_ORDER, can_run, leading_call
from graphrl.parallel import Strategy


def shared_engine_calls(calls: Sequence[Any], pins: Mapping[str, Any]
                        ) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Follower call name -> its model's leading call name, and leader -> its followers
    (the search's CallInfos: `name`, `call`, `model`, `phase`)."""
    leader: dict[str, str] = {}
    followers: dict[str, tuple[str, ...]] = {}
    for model in dict.fromkeys(c.model for c in calls if c.phase != "op"):
        mine = [c for c in calls if c.model == model and c.phase != "op"]
        lead = leading_call(mine, lambda c: c.phase)
        if lead is None:
            continue
        tied = tuple(c.name for c in mine if c.phase != "generate" and c is not lead
                     and not (c.call in pins and (pins[c.call].fields
                                                  or pins[c.call].strategy is not None)))
        followers[lead.name] = tied
        leader.update({name: lead.name for name in tied})
    return leader, followers


def engine_variants(phase: str, s: Strategy, fixed: str = "",
                    features: frozenset[str] = frozenset()) -> list[Strategy]:
    """`s` on each engine that executes it for a `phase` call: generate as it is; the
    model's `fixed` engine when there is one; else each of hf (as ""), deepspeed,
    megatron that runs it and implements the model's architecture `features`
    (graphrl.architecture: an engine that lacks one is never chosen for it)."""
    if phase == "generate":
        return [s]
    return [replace(s, engine="" if e == "hf" else e)
            for e in ((fixed,) if fixed else AUTO_ORDER) if can_run(e, phase, s)
            and (fixed or features <= ENGINE_FEATURES.get(e, frozenset()))]


__all__ = ["shared_engine_calls", "engine_variants"]
