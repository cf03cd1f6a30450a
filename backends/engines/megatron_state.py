"""Checkpoints of a MegatronEngine (megatron.py): each rank writes its shard in parallel
(shard_state.py's `megatron` format); loading takes this rank's part of a full state.

Saving (no collective): the data-parallel rank 0 of every (pp, tp) coordinate writes its
megatron-core parameters and the Adam moments its optimizer holds; under ZeRO-1 with
dp > 1 the other data-parallel ranks write the moments of the parameters their
ZeroRedundancyOptimizer shard owns. The engine's first rank writes index.json.

Loading: the full HF state (shard_state.read_model_state: from any engine, placement or
backend) is cut into this rank's megatron-core parameters by megatron_convert.to_megatron;
the Adam moments by the same map (they have their parameters' layout), with the step
count and hyper-parameters, into a fresh optimizer (ZeRO-1: each rank keeps the state of
the parameters it owns).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from graphrl.errors import UsageError

from .shard_state import (MOMENTS, hyper_groups, moments_by_name, save_index, save_shard,
                          shard_file, spec_fields)


def hf_param_names(eng: Any) -> list[str]:
    """The HF model's parameter names (its state-dict names less a tied LM head)."""
    tied = eng.spec.head == "lm" and eng.spec.tie_embeddings
    return [n for n in eng.hf_names if not (tied and n == "lm_head.weight")]


def _writers(eng: Any) -> list[int]:
    """Global ranks that write a shard: data-parallel rank 0 of each (pp, tp); every
    rank under ZeRO-1 with dp > 1 (its part of the optimizer state)."""
    per = eng.tp * eng.pp
    sharded_opt = eng.zero == 1 and eng.dp > 1 and eng.optimizer is not None
    return [r for i, r in enumerate(eng.ranks) if sharded_opt or i < per]


def save_shards(eng: Any, folder: Path) -> list[str]:
    """Write this rank's shard (and, on the first rank, index.json) into `folder`
    (a checkpoint's models/<model>/); returns the files written, relative to it."""
    written = []
    has_opt = eng.optimizer is not None
    if eng.rank in _writers(eng):
        body: dict[str, Any] = {"pp_rank": eng.pp_rank, "tp_rank": eng.tp_rank,
                                "dp_rank": eng.dp_rank, "step": None, "moments": None,
                                "weights": eng.local_state() if eng.dp_rank == 0 else None}
        if has_opt:
            local = getattr(eng.optimizer, "optim", eng.optimizer)   # ZeRO-1: its shard
            body["moments"], body["step"] = moments_by_name(local, eng._params())
        written.append(save_shard(folder, eng.rank, body))
    if eng.rank == eng.ranks[0]:
        save_index(folder, {
            "format": "megatron", "engine": "megatron", "version": eng.version,
            "dp": eng.dp, "tp": eng.tp, "pp": eng.pp, "zero": eng.zero,
            "spec": spec_fields(eng.spec), "names": list(eng.hf_names),
            "params": hf_param_names(eng), "optimizer": has_opt,
            "param_groups": hyper_groups(eng.optimizer) if has_opt else None,
            "files": [shard_file(r) for r in _writers(eng)]})
        written.append("index.json")
    return written


def load_state(eng: Any, state: Mapping[str, Any]) -> None:
    """Restore a full state (engine_state form) onto this rank's part of the model."""
    from .megatron_convert import to_megatron

    eng.load_weights(state["weights"])
    eng.optimizer = None
    named = state.get("optimizer")
    if named is not None:
        groups = named["param_groups"]
        if len(groups) != 1:
            raise UsageError(f"model {eng.decl.name}: optimizer state with {len(groups)} "
                             "parameter groups (the megatron engine has one)")
        missing = sorted(set(hf_param_names(eng)) - set(named["state"]))
        if missing:
            raise UsageError(f"model {eng.decl.name}: the checkpoint's optimizer state "
                             f"lacks {missing[:3]}")
        local = {k: to_megatron({n: s[k] for n, s in named["state"].items()}, eng.spec,
                                tp=eng.tp, tp_rank=eng.tp_rank, pp=eng.pp,
                                pp_rank=eng.pp_rank) for k in MOMENTS}
        step = next(iter(named["state"].values()))["step"]
        params = eng._params()
        opt_state = {i: {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                         **{k: local[k][n].to(p.device) for k in MOMENTS}}
                     for i, (n, p) in enumerate(params)}
        hyper = {k: (tuple(v) if k == "betas" else v) for k, v in groups[0].items()
                 if k != "params"}
        eng._optimizer().load_state_dict({"state": opt_state, "param_groups": [
            {**hyper, "params": list(range(len(params)))}]})
    eng.version = int(state["version"])


__all__ = ["save_shards", "load_state", "hf_param_names"]
