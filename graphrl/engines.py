"""Which engine runs each call, and whether it can run the call's planned strategy.

Engines (backends/engines/) and what they execute exactly, degree for degree:
- `hf`: Hugging Face modules. Generation and inference with tp = pp = 1 (data-parallel
  replicas); training with tp = pp = 1 and ZeRO 0 (DDP-style gradient averaging) or
  ZeRO-3 (FSDP2). It cannot shard only optimizer state or gradients (ZeRO-1/2).
- `megatron`: megatron-core GPTModel. Inference and training with any tp, pp (1F1B over
  the plan's micro-batches) and dp, sequence parallelism with tp > 1, ZeRO 0 or 1.
  No generation.
- `deepspeed`: DeepSpeed ZeRO 0-3 with tp = pp = 1. No generation.

A model's forward and train calls share one engine (one mesh, one copy of the weights);
its generate call runs on its own `hf` engine (after a reshard when layouts differ). The
engine of a model's forward/train calls is the one pinned on any of them (placement
`engine:`), else the model's declared engine when it is not the default `hf`, else the
first of hf, deepspeed, megatron that runs the planned strategy of its train call (or,
frozen, of its forward calls). A call whose planned strategy its engine cannot run is
refused, naming the call, the strategy and the engines that can: never a fallback.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Optional

from .errors import UsageError

ENGINES = ("hf", "megatron", "deepspeed", "fast")   # fast: hf with its own generate
AUTO_ORDER = ("hf", "deepspeed", "megatron")


def can_run(engine: str, target: str, strategy: Any) -> bool:
    """Whether `engine` executes `target` (generate | forward | train) with exactly the
    degrees of `strategy`."""
    s = strategy
    flat = s.tp == 1 and s.pp == 1
    if engine in ("hf", "fast"):
        if target == "train":
            return flat and (s.zero in (0, 3) or s.dp == 1)
        return flat
    if engine == "megatron":
        return target != "generate" and s.zero in (0, 1)
    if engine == "deepspeed":
        return target != "generate" and flat
    return False


def able(target: str, strategy: Any) -> list[str]:
    return [e for e in ENGINES if can_run(e, target, strategy)]


def _refuse(node: Any, engine: str, why: str) -> UsageError:
    s = node.placement.strategy
    others = able(node.target, s)
    can = (f"engines that can: {', '.join(others)}" if others else
           "no engine here can run it")
    return UsageError(f"call {node.call} ({node.name}): engine {engine} cannot run its "
                      f"strategy {s.text()} on GPUs {node.placement.mesh.text()} ({why}); "
                      f"{can}")


def _why(engine: str, target: str) -> str:
    return {"hf": "hf runs tp = pp = 1, and trains with ZeRO 0 or 3 only",
            "fast": "fast runs tp = pp = 1, and trains (as hf) with ZeRO 0 or 3 only",
            "megatron": "megatron does not generate, and shards optimizer state (ZeRO-1) "
                        "at most",
            "deepspeed": "deepspeed does not generate, and runs tp = pp = 1 only",
            }.get(engine, f"unknown engine (known: {', '.join(ENGINES)})")


def resolve_engines(graph: Any, declared: Optional[Mapping[str, str]] = None
                    ) -> dict[str, str]:
    """Call node name -> the engine that runs it (see module doc); raises UsageError for a
    strategy its engine cannot run. `declared`: model -> engine, default the graph's
    model declarations."""
    declared = dict(declared or {m.name: m.engine for m in graph.models})
    out: dict[str, str] = {}
    for decl in graph.models:
        calls = [n for n in graph.nodes if n.kind == "call" and n.model == decl.name
                 and n.placement is not None]
        main = [n for n in calls if n.target != "generate"]
        for n in calls:
            if n.target == "generate":
                pinned = n.placement.strategy.engine
                engine = pinned or ("fast" if declared.get(decl.name) == "fast" else "hf")
                if not can_run(engine, "generate", n.placement.strategy):
                    raise _refuse(n, engine, _why(engine, "generate"))
                out[n.name] = engine
        if not main:
            continue
        pins = sorted({n.placement.strategy.engine for n in main} - {""})
        if len(pins) > 1:
            raise UsageError(f"model {decl.name}: its calls are pinned to different engines "
                             f"{pins}; its forward and train calls share one engine")
        train = next((n for n in main if n.target == "train"), None)
        deciding = [train] if train is not None else main
        # a model declared hf or fast (hf with its own generate) trains on any engine able
        explicit = pins[0] if pins else (declared.get(decl.name, "hf")
                                         if declared.get(decl.name, "hf") not in ("hf", "fast")
                                         else "")
        if explicit:
            engine = explicit
        else:
            engine = next((e for e in AUTO_ORDER
                           if all(can_run(e, n.target, n.placement.strategy)
                                  for n in deciding)), "hf")
        for n in deciding:
            if not can_run(engine, n.target, n.placement.strategy):
                raise _refuse(n, engine, _why(engine, n.target))
        for n in main:
            out[n.name] = engine
    return out


def with_engines(graph: Any, pins: Mapping[str, Any]) -> Any:
    """The graph with each pinned call's strategy naming its pinned engine."""
    engines = {call: p.engine for call, p in pins.items() if getattr(p, "engine", "")}
    if not engines:
        return graph
    return graph.with_nodes(
        replace(n, placement=replace(n.placement, strategy=replace(
            n.placement.strategy, engine=engines[n.call])))
        if n.kind == "call" and n.call in engines and n.placement is not None else n
        for n in graph.nodes)


__all__ = ["ENGINES", "can_run", "able", "resolve_engines", "with_engines"]
