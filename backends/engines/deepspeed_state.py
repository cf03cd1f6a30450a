"""Checkpoints of a DeepSpeedEngine (deepspeed_engine.py): each rank writes the slices of
the fp32 weights and Adam moments its ZeRO partition owns, in parallel (shard_state.py's
`flat` format); loading takes this rank's partition of a full state.

What a rank owns, per HF parameter, as a slice [start, start + numel) of the parameter's
row-major flattening:
- ZeRO-1/2: the fragment of its fp32 master partition DeepSpeed maps to the parameter
  (`param._hp_mapping`: `lp_fragment_address` in the parameter, `get_hp_fragment(key)`
  the fp32 weights or an optimizer state key; the same links DeepSpeed's own
  `safe_get_full_fp32_param` / universal checkpoints use);
- ZeRO-3: its `ds_tensor` partition (rank i: elements i*k.. of the flattening, k the
  partition size), less the end padding (`safe_get_local_fp32_param`,
  `safe_get_local_optimizer_state`);
- ZeRO-0: rank 0 writes whole tensors (every rank holds the same).
A frozen parameter (the base under LoRA: no optimizer state) is written as weights only:
its `ds_tensor` partition as held under ZeRO-3, whole by rank 0 under ZeRO 0-2; the index
lists the trained parameters (`trained`), the ones with Adam moments.
Saving is no collective. A state-dict entry that is no parameter of its own (a tied LM
head) is recorded as an alias; any other (a persistent buffer) is written whole by rank 0.

Loading rebuilds the DeepSpeed engine around a module holding the full weights (so the
fp32 master partitions are copies of them), then fills the Adam state of each flat fp32
partition from the full moments through DeepSpeed's `safe_set_full_optimizer_state`
(padding stays zero, as it is in a run that never stopped), with the step count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from graphrl.errors import UsageError

from .shard_state import MOMENTS, hyper_groups, save_index, save_shard, shard_file


def _base(eng: Any) -> Any:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (ZeRO-0: DeepSpeed's own)."""
    opt = eng.ds.optimizer
    return getattr(opt, "optimizer", opt) if eng.zero else opt


def _flat_partitions(eng: Any) -> list[Any]:
    """The tensors the torch optimizer steps (and keys its state by): DeepSpeed's fp32
    partitions (ZeRO-1/2: one per group; ZeRO-3: one per sub-group), or the module's
    parameters (ZeRO-0)."""
    opt = eng.ds.optimizer
    if eng.zero == 3:
        return list(opt.fp32_partitioned_groups_flat)
    if eng.zero:
        return list(opt.single_partition_of_fp32_groups)
    return [p for g in opt.param_groups for p in g["params"]]


def _has_state(eng: Any) -> bool:
    return any(bool(s) for s in _base(eng).state.values())


def _step(eng: Any) -> float | None:
    for s in _base(eng).state.values():
        if s:
            return float(s["step"])
    return None


def _named(eng: Any) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Parameters by name, aliases (state-dict name -> parameter name) and other
    state-dict entries (buffers)."""
    module = eng.hf.module
    params = dict(module.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    aliases, extra = {}, []
    for name, v in module.state_dict(keep_vars=True).items():
        if name in params:
            continue
        if id(v) in by_id:
            aliases[name] = by_id[id(v)]
        else:
            extra.append(name)
    return params, aliases, extra


def _piece(eng: Any, p: Any, keys: list[str]) -> tuple[tuple[int, int], dict[str, Any]] | None:
    """This rank's slice of parameter `p`: ((start, numel), key -> flat tensor), keys
    "weights" and the optimizer state keys (a frozen parameter: "weights" only, as
    held); None when it owns none of it."""
    if not p.requires_grad:
        if eng.zero == 3:
            k = p.ds_tensor.numel()
            start = eng.dp_rank * k
            numel = max(0, min(k, p.ds_numel - start))
            data = p.ds_tensor.data
        else:
            start, numel, data = 0, p.numel() if eng.dp_rank == 0 else 0, p.data
        if numel == 0:
            return None
        return (start, numel), {"weights": data.reshape(-1)[:numel].detach().cpu().clone()}
    if eng.zero == 3:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = safe_get_local_fp32_param(p)
        k = local.numel()
        start = eng.dp_rank * k
        numel = max(0, min(k, p.ds_numel - start))
        if numel == 0:
            return None
        got = {"weights": local}
        got.update({key: safe_get_local_optimizer_state(p, key) for key in keys[1:]})
        return (start, numel), {key: t.reshape(-1)[:numel].detach().cpu().clone()
                                for key, t in got.items()}
    if eng.zero == 0:
        if eng.dp_rank:
            return None
        state = _base(eng).state.get(p, {})
        got = {"weights": p.data, **{key: state[key] for key in keys[1:]}}
        return (0, p.numel()), {key: t.reshape(-1).detach().cpu().clone()
                                for key, t in got.items()}
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    addr = mapping.lp_fragment_address
    got = {"weights": mapping.get_hp_fragment()}
    got.update({key: mapping.get_hp_fragment(key) for key in keys[1:]})
    return (int(addr.start), int(addr.numel)), {key: t.reshape(-1).detach().cpu().clone()
                                                for key, t in got.items()}


def save_shards(eng: Any, folder: Path) -> list[str]:
    """Write this rank's shard (and, on the first rank, index.json) into `folder`
    (a checkpoint's models/<model>/); returns the files written, relative to it."""
    params, aliases, extra = _named(eng)
    has_opt = _has_state(eng)
    keys = ["weights"] + (list(MOMENTS) if has_opt else [])
    body: dict[str, Any] = {k: {} for k in keys}
    body.update(pieces={}, step=_step(eng) if has_opt else None, extra={})
    for name, p in params.items():
        got = _piece(eng, p, keys)
        if got is None:
            continue
        body["pieces"][name] = got[0]
        for k, t in got[1].items():
            body[k][name] = t
    if eng.dp_rank == 0 and extra:
        sd = eng.hf.module.state_dict()
        body["extra"] = {n: sd[n].detach().cpu().clone() for n in extra}
    written = [save_shard(folder, eng.rank, body)]
    if eng.dp_rank == 0:
        save_index(folder, {
            "format": "flat", "engine": "deepspeed", "version": eng.version,
            "dp": eng.dp, "zero": eng.zero, "names": list(eng.names),
            "shapes": {n: list(p.ds_shape if eng.zero == 3 else p.shape)
                       for n, p in params.items()},
            "params": list(params), "aliases": aliases, "extra_from": eng.rank,
            "trained": [n for n, p in params.items() if p.requires_grad],
            "optimizer": has_opt,
            "param_groups": hyper_groups(_base(eng)) if has_opt else None,
            "files": [shard_file(r) for r in eng.ranks]})
        written.append("index.json")
    return written


def load_state(eng: Any, state: Mapping[str, Any]) -> None:
    """Restore a full state (engine_state form): a DeepSpeed engine rebuilt around the
    weights (a collective of the mesh, as building it is), then the Adam state."""
    from .hf import HFEngine

    eng.hf = HFEngine(eng.decl, eng.options, device=eng.device_name, seed=eng.seed)
    eng.hf.load_weights(state["weights"])
    eng._initialize()
    named = state.get("optimizer")
    if named is not None:
        _load_moments(eng, named)
    eng.version = int(state["version"])


def _load_moments(eng: Any, named: Mapping[str, Any]) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    params, _, _ = _named(eng)
    params = {n: p for n, p in params.items() if p.requires_grad}   # LoRA: the adapters
    missing = sorted(set(params) - set(named["state"]))
    if missing:
        raise UsageError(f"model {eng.decl.name}: the checkpoint's optimizer state lacks "
                         f"{missing[:3]}")
    base = _base(eng)
    step = next(iter(named["state"].values()))["step"]
    groups = named["param_groups"]
    for g in base.param_groups:
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in groups[0].items()
                  if k != "params"})
    for flat in _flat_partitions(eng):   # fresh Adam state of each fp32 partition
        base.state[flat] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                            **{k: torch.zeros_like(flat) for k in MOMENTS}}
    if eng.zero in (1, 2):   # link each parameter's fragment to the new state tensors
        eng.ds.optimizer._hp_optimizer_states_linked = False
        eng.ds.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in params.items():
        for k in MOMENTS:
            value = named["state"][name][k].to(p.device)
            if eng.zero == 0:
                base.state[p][k].copy_(value)
            elif eng.zero == 3:   # this rank's padded partition (DeepSpeed 0.19.8's
                _set_local(eng, p, value, k)   # set_full_hp_param misses the padding)
            else:
                safe_set_full_optimizer_state(p, value, k)



def _set_local(eng: Any, p: Any, value: torch.Tensor, key: str) -> None:
    from deepspeed.utils import safe_set_local_optimizer_state

    k = p.ds_tensor.numel()
    flat = torch.zeros(k * eng.dp, dtype=value.dtype, device=value.device)
    flat[:value.numel()] = value.reshape(-1)
    safe_set_local_optimizer_state(p, flat[eng.dp_rank * k:(eng.dp_rank + 1) * k], key)


__all__ = ["save_shards", "load_state"]
