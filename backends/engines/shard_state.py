"""Sharded engine state on disk: each rank of a sharded engine (megatron-core, DeepSpeed)
writes only what it holds, in parallel, and any engine on any placement loads it.

A model's sharded state is a folder `models/<model>/` of a checkpoint:

    index.json      written by the engine's first rank: the format (`flat` or
                    `megatron`), the engine's degrees, the version, the HF names and
                    shapes of the weights, the optimizer's hyper-parameters and step
                    count, and every shard file the engine writes
    rank<R>.pt      what global rank R holds (torch.save of tensors by name)

Two shard formats:
- `flat` (DeepSpeed ZeRO 0-3): for each HF parameter name, the slice [start, start +
  numel) of its row-major flattening that the rank owns (ZeRO-1/2: the fragment of the
  fp32 master partition DeepSpeed maps to the parameter, `_hp_mapping`; ZeRO-3: the
  rank's `ds_tensor` partition without its end padding; ZeRO-0: rank 0 writes whole
  tensors), with the same slices of Adam's moments. Frozen parameters (a LoRA base) have
  weights only; the index's `trained` lists those with moments (absent: all).
- `megatron` (megatron-core): each (pp, tp) coordinate's local megatron-core parameters
  by their megatron names (written by its data-parallel rank 0), and the Adam moments
  each rank's optimizer holds (ZeRO-1 splits them over the data-parallel ranks).

`read_model_state` turns either (or the single-file `models/<model>.pt` of unsharded
engines) into the placement-independent full state of engines/engine_state.py: full
weights by HF name, optimizer state by HF parameter name, the version. Megatron shards
are put together by megatron_convert.from_megatron (moments have their parameters'
layout, so the same exact copy-and-concatenate maps them). Every element of every
tensor must come from some shard: a missing file or an uncovered range is refused,
naming the file or the parameter, before any engine is touched.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from graphrl.errors import UsageError

INDEX = "index.json"
MOMENTS = ("exp_avg", "exp_avg_sq")   # torch AdamW's per-parameter state besides `step`


def shard_file(rank: int) -> str:
    return f"rank{rank}.pt"


def save_shard(folder: Path, rank: int, body: Mapping[str, Any]) -> str:
    """Write this rank's shard file (fsynced); returns its name."""
    from graphrl.checkpoint import save_torch

    save_torch(dict(body), folder / shard_file(rank))
    return shard_file(rank)


def save_index(folder: Path, index: Mapping[str, Any]) -> None:
    from graphrl.checkpoint import file_written

    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True), encoding="utf-8")
    file_written(folder / INDEX)


def hyper_groups(optimizer: Any) -> list[dict[str, Any]]:
    """An optimizer's param groups without their parameters (JSON-safe hyper-parameters)."""
    out = []
    for g in optimizer.param_groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                    if k != "params" and isinstance(v, (int, float, bool, str, tuple, list,
                                                        type(None)))})
    return out


# -- reading ------------------------------------------------------------------------------
def has_model_state(models_dir: Path, model: str) -> bool:
    return (models_dir / f"{model}.pt").is_file() or (models_dir / model / INDEX).is_file()


def read_model_state(models_dir: Path, model: str) -> dict[str, Any]:
    """The full state of `model` from `models_dir` (a checkpoint's models/ folder): one
    file, or the shards of a sharded engine put together."""
    from graphrl.checkpoint import load_torch

    single = models_dir / f"{model}.pt"
    if single.is_file():
        return load_torch(single)
    folder = models_dir / model
    if not (folder / INDEX).is_file():
        raise UsageError(f"checkpoint {models_dir.parent}: no state of model {model!r} "
                         f"(neither models/{model}.pt nor models/{model}/{INDEX})")
    index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    shards = {}
    for name in index["files"]:
        f = folder / name
        if not f.is_file():
            raise UsageError(f"checkpoint {models_dir.parent}: shard models/{model}/{name} "
                             f"is missing ({INDEX} lists it)")
        shards[name] = load_torch(f)
    where = f"checkpoint {models_dir.parent}: models/{model}"
    if index["format"] == "flat":
        state = _assemble_flat(index, shards, where)
    elif index["format"] == "megatron":
        state = _assemble_megatron(index, shards, where)
    else:
        raise UsageError(f"{where}/{INDEX}: unknown shard format {index['format']!r}")
    state["version"] = int(index["version"])
    return state


def _step(shards: Mapping[str, Mapping[str, Any]], where: str) -> float:
    """The optimizer's step count, which every shard holding moments records."""
    steps = {float(b["step"]) for b in shards.values() if b.get("step") is not None}
    if len(steps) != 1:
        raise UsageError(f"{where}: the shards record optimizer steps {sorted(steps)} "
                         "(one count expected)")
    return steps.pop()


def _optimizer(index: Mapping[str, Any], moments: Mapping[str, Mapping[str, torch.Tensor]],
               step_count: float) -> dict[str, Any]:
    """engine_state's named optimizer form from full moments by HF parameter name."""
    params = list(index.get("trained", index["params"]))   # LoRA: the adapters only
    step = torch.tensor(float(step_count))
    state = {n: {"step": step.clone(), **{k: moments[k][n] for k in MOMENTS}} for n in params}
    groups = index["param_groups"]
    if len(groups) != 1:
        raise UsageError(f"sharded optimizer state with {len(groups)} parameter groups "
                         "(one expected)")
    hyper = {k: (tuple(v) if k == "betas" else v) for k, v in groups[0].items()}
    return {"state": state, "param_groups": [{**hyper, "params": params}]}


def _assemble_flat(index: Mapping[str, Any], shards: Mapping[str, Mapping[str, Any]],
                   where: str) -> dict[str, Any]:
    shapes = {n: tuple(s) for n, s in index["shapes"].items()}
    kinds = ["weights"] + (list(MOMENTS) if index["optimizer"] else [])
    full = {k: {n: torch.empty(torch.Size(s).numel()) for n, s in shapes.items()}
            for k in kinds}
    seen = {n: torch.zeros(torch.Size(s).numel(), dtype=torch.int32) for n, s in shapes.items()}
    trained = set(index.get("trained", shapes))   # frozen (LoRA's base): weights only
    for fname, body in sorted(shards.items()):
        for n, (start, numel) in body["pieces"].items():
            if n not in shapes:
                raise UsageError(f"{where}/{fname}: parameter {n} is not in {INDEX}")
            for k in (kinds if n in trained else kinds[:1]):
                t = body[k][n].reshape(-1)
                if t.numel() != numel:
                    raise UsageError(f"{where}/{fname}: {k} of {n} has {t.numel()} "
                                     f"elements, its piece says {numel}")
                full[k][n][start:start + numel] = t
            seen[n][start:start + numel] += 1
    for n, s in seen.items():
        if bool((s != 1).any()):
            lo = int((s != 1).nonzero()[0])
            raise UsageError(f"{where}: parameter {n}: element {lo} is in "
                             f"{int(s[lo])} shards (every element must be in exactly one)")
    weights = {}
    params = {n: full["weights"][n].reshape(shapes[n]) for n in shapes}
    for name in index["names"]:
        src = index["aliases"].get(name, name)
        weights[name] = params[src] if src in params else shards[shard_file(
            index["extra_from"])]["extra"][name]
    moments = {k: {n: full[k][n].reshape(shapes[n]) for n in shapes if n in trained}
               for k in MOMENTS if k in full}
    optimizer = _optimizer(index, moments, _step(shards, where)) if index["optimizer"] else None
    return {"weights": weights, "optimizer": optimizer}


def _assemble_megatron(index: Mapping[str, Any], shards: Mapping[str, Mapping[str, Any]],
                       where: str) -> dict[str, Any]:
    from graphrl.types import ModelSpec

    from .megatron_convert import from_megatron

    spec = ModelSpec(**index["spec"])
    tp, pp = int(index["tp"]), int(index["pp"])
    names = list(index["names"])
    weights: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    moments: dict[str, dict[tuple[int, int], dict[str, torch.Tensor]]] = {k: {} for k in MOMENTS}
    for fname, body in sorted(shards.items()):
        coord = (int(body["pp_rank"]), int(body["tp_rank"]))
        if body.get("weights") is not None:
            weights[coord] = body["weights"]
        for k in MOMENTS:
            for n, t in (body.get("moments") or {}).get(k, {}).items():
                got = moments[k].setdefault(coord, {})
                if n in got:
                    raise UsageError(f"{where}/{fname}: {k} of {n} at (pp {coord[0]}, tp "
                                     f"{coord[1]}) is in two shards")
                got[n] = t
    try:
        full = from_megatron(weights, spec, tp, pp, order=names)
    except (KeyError, UsageError) as e:
        raise UsageError(f"{where}: the weight shards do not make the whole model "
                         f"(tp {tp}, pp {pp}): {e}") from None
    optimizer = None
    if index["optimizer"]:
        hf = {}
        for k in MOMENTS:
            try:
                hf[k] = from_megatron(moments[k], spec, tp, pp, order=names)
            except (KeyError, UsageError) as e:
                raise UsageError(f"{where}: the optimizer shards lack {k} of {e} "
                                 f"(tp {tp}, pp {pp})") from None
        optimizer = _optimizer(index, hf, _step(shards, where))
    return {"weights": full, "optimizer": optimizer}


def spec_fields(spec: Any) -> dict[str, Any]:
    """A ModelSpec as JSON-safe fields (index.json), to rebuild it on load."""
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def moments_by_name(optimizer: Any, named: Iterable[tuple[str, Any]]) -> tuple[
        dict[str, dict[str, torch.Tensor]], float | None]:
    """A torch optimizer's Adam moments keyed by parameter name (for the parameters
    `named` that have state here), and its step count (None before the first step)."""
    by_id = {id(p): n for n, p in named}
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in MOMENTS}
    step = None
    for p, s in optimizer.state.items():
        n = by_id.get(id(p))
        if n is None or not s:
            continue
        for k in MOMENTS:
            out[k][n] = s[k].detach().cpu().clone()
        step = float(s["step"])
    return out, step


__all__ = ["read_model_state", "has_model_state", "save_shard", "save_index", "shard_file",
           "hyper_groups", "spec_fields", "moments_by_name", "INDEX", "MOMENTS"]
