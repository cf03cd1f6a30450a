"""Which engine runs each call, and whether it can run the call's planned strategy.

Engines (backends/engines/) and what they execute exactly, degree for degree:
- `hf`: Hugging Face modules. Generation and inference with tp = pp = 1 (data-parallel
  replicas); training with tp = pp = 1 and ZeRO 0 (DDP-style gradient averaging) or
  ZeRO-3 (FSDP2), one micro-batch per minibatch. It cannot shard only optimizer state
  or gradients (ZeRO-1/2), accumulate micro-batches or offload the optimizer.
- `megatron`: megatron-core GPTModel. Inference and training with any tp, pp (1F1B over
  the plan's micro-batches) and dp, sequence parallelism with tp > 1, ZeRO 0 or 1.
  No generation, no optimizer offload.
- `deepspeed`: DeepSpeed ZeRO 0-3 with tp = pp = 1, micro-batches (gradient
  accumulation), optimizer offload. No generation.

A model's forward and train calls share one engine (one mesh, one copy of the weights),
built with the strategy of its *leading* call: its train call, or (frozen) its first
forward call. So the compiler plans every other forward call of the model with that
strategy (`shared_strategy`: the leader's dp, tp, pp, ZeRO stage and engine; pipeline
micro-batches; no recompute or optimizer offload, which only training has), and a call
pinned to another strategy is refused before launch (no engine instance of its own).
Its generate call runs on its own `hf` engine (after a reshard when layouts differ). The
engine of a model's forward/train calls is the one pinned on any of them (placement
`engine:`, or the placement search's choice, both in `Strategy.engine`), else the
model's declared engine when it is not the default `hf`, else the first of hf,
deepspeed, megatron that runs the planned strategy of its leading call. A call whose
planned strategy its engine cannot run is refused, naming the call, the strategy and the
engines that can: never a fallback; so is a model with an architecture feature one of its
engines does not implement (graphrl.architecture.refuse_unsupported: model, engine,
feature). `planned_degrees` / `degree_mismatches`: what a run reports as executed
(engine, dp, tp, pp, sp, ZeRO, micro-batches, precision) against the plan; the planned
precision is the model spec's `dtype` (bf16 or fp32).
"""
from __future__ import annotations

from dataclasses import replace
from operator import attrgetter
from typing import Any, Callable, Mapping, Optional, Sequence

from .architecture import ENGINE_FEATURES, refuse_unsupported
from .errors import UsageError

ENGINES = ("hf", "megatron", "deepspeed", "fast")   # fast: hf with its own generate
AUTO_ORDER = ("hf", "deepspeed", "megatron")


def can_run(engine: str, target: str, strategy: Any) -> bool:
    """Whether `engine` executes `target` (generate | forward | train) with exactly the
    degrees of `strategy`."""
    s = strategy
    flat = s.tp == 1 and s.pp == 1
    if engine in ("hf", "fast"):   # one pass per minibatch: no gradient accumulation
        if target == "train":
            return (flat and (s.zero in (0, 3) or s.dp == 1) and s.micro_batches == 1
                    and not s.offload)
        return flat
    if engine == "megatron":
        return target != "generate" and s.zero in (0, 1) and not s.offload
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
    return {"hf": "hf runs tp = pp = 1, and trains with ZeRO 0 or 3 and one micro-batch",
            "fast": "fast runs tp = pp = 1, and trains (as hf) with ZeRO 0 or 3 and one "
                    "micro-batch",
            "megatron": "megatron does not generate or offload, and shards optimizer "
                        "state (ZeRO-1) at most",
            "deepspeed": "deepspeed does not generate, and runs tp = pp = 1 only",
            }.get(engine, f"unknown engine (known: {', '.join(ENGINES)})")


def leading_call(calls: Sequence[Any], target_of: Callable[[Any], str] = attrgetter("target")
                 ) -> Any:
    """The call a model's shared forward/train engine is built for: its first train
    call, else its first forward call (None when it has neither)."""
    main = [n for n in calls if target_of(n) in ("forward", "train")]
    return next((n for n in main if target_of(n) == "train"), main[0] if main else None)


def shared_strategy(leader: Any, target: str, batch: int) -> Any:
    """The strategy a `target` call over `batch` rows runs with on an engine built with
    the `leader` strategy: a train call all of it; a forward call its dp, tp, pp and
    engine, ZeRO-3 (weights gathered per pass; ZeRO-1/2 shard only optimizer state and
    gradients, which a forward has none of: 0), its micro-batches only through a
    pipeline (pp > 1, when they divide the rows of each replica: megatron's forward), no
    recompute and no optimizer offload (nothing to recompute or step without backward)."""
    if target == "train":
        return leader
    per_replica = batch // leader.dp if batch % leader.dp == 0 else 0
    mb = (leader.micro_batches if leader.pp > 1 and per_replica
          and per_replica % leader.micro_batches == 0 else 1)
    return replace(leader, micro_batches=mb, zero=3 if leader.zero == 3 else 0,
                   recompute=0, offload=0)


def _rows(graph: Any, node: Any) -> int:
    data = [graph.value(i).spec for i in node.inputs if not graph.value(i).spec.is_weights]
    return data[0].batch if data else 0


def _refuse_shared(graph: Any, n: Any, leader: Any, engine: str) -> UsageError:
    s, ls = n.placement.strategy, leader.placement.strategy
    runs = shared_strategy(ls, n.target, _rows(graph, n))
    others = able(n.target, s)
    where = (f"on GPUs {n.placement.mesh.text()}, not its engine's GPUs "
             f"{leader.placement.mesh.text()}" if n.placement.mesh != leader.placement.mesh
             else f"while that engine runs it as {runs.text()}")
    return UsageError(
        f"call {n.call} ({n.name}): planned strategy {s.text()} {where}: a model's forward "
        f"and train calls share one {engine} engine (one copy of the weights), built for "
        f"{leader.call} with {ls.text()} on GPUs {leader.placement.mesh.text()}, and no "
        f"second engine instance is built for one call; pin {n.call} to "
        f"{runs.text()} on those GPUs (or drop its pin). Engines that can run "
        f"{replace(s, engine='').text()}: {', '.join(others) if others else 'none here'}")


def resolve_engines(graph: Any, declared: Optional[Mapping[str, str]] = None
                    ) -> dict[str, str]:
    """Call node name -> the engine that runs it (see module doc); raises UsageError for a
    strategy its engine cannot run, or a forward call planned apart from its model's
    shared engine. `declared`: model -> engine, default the graph's model declarations."""
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
                refuse_unsupported(decl.name, engine, decl.spec.arch)
                out[n.name] = engine
        if not main:
            continue
        pins = sorted({n.placement.strategy.engine for n in main} - {""})
        if len(pins) > 1:
            raise UsageError(f"model {decl.name}: its calls are pinned to different engines "
                             f"{pins}; its forward and train calls share one engine")
        leader = leading_call(main)
        # a model declared hf or fast (hf with its own generate) trains on any engine able
        explicit = pins[0] if pins else (declared.get(decl.name, "hf")
                                         if declared.get(decl.name, "hf") not in ("hf", "fast")
                                         else "")
        if explicit:
            engine = explicit
        else:
            able_ = [e for e in AUTO_ORDER
                     if can_run(e, leader.target, leader.placement.strategy)]
            features = set(decl.spec.arch.features())   # prefer one implementing them
            engine = next((e for e in able_ if features <= ENGINE_FEATURES.get(e, set())),
                          able_[0] if able_ else "hf")
        if not can_run(engine, leader.target, leader.placement.strategy):
            raise _refuse(leader, engine, _why(engine, leader.target))
        refuse_unsupported(decl.name, engine, decl.spec.arch)
        lead = leader.placement.strategy
        for n in main:
            runs = shared_strategy(lead, n.target, _rows(graph, n))
            if n.placement.mesh != leader.placement.mesh or \
                    replace(n.placement.strategy, engine="") != replace(runs, engine=""):
                raise _refuse_shared(graph, n, leader, engine)
            out[n.name] = engine
    return out


def with_engines(graph: Any, pins: Mapping[str, Any]) -> Any:
    """The graph with each pinned call's strategy naming its pinned engine, and so the
    strategies of the other forward/train calls of its model (they share the engine)."""
    engines = {call: p.engine for call, p in pins.items() if getattr(p, "engine", "")}
    if not engines:
        return graph
    by_model = {n.model: engines[n.call] for n in graph.nodes
                if n.kind == "call" and n.call in engines and n.target != "generate"}

    def engine_of(n: Any) -> str:
        if n.call in engines:
            return engines[n.call]
        return by_model.get(n.model, "") if n.target != "generate" else ""

    return graph.with_nodes(
        replace(n, placement=replace(n.placement, strategy=replace(
            n.placement.strategy, engine=engine_of(n))))
        if n.kind == "call" and engine_of(n) and n.placement is not None else n
        for n in graph.nodes)


DEGREES = ("engine", "dp", "tp", "pp", "sp", "zero", "micro_batches", "offload",
           "precision")


def planned_degrees(engine: str, target: str, strategy: Any, *, precision: str
                    ) -> dict[str, Any]:
    """What an engine running `strategy` for a `target` call of a model planned in
    `precision` (its spec's dtype) reports as executed (`degrees()` of the engines):
    offload for training only."""
    s = strategy
    out = {"engine": engine, "dp": s.dp, "tp": s.tp, "pp": s.pp,
           "sp": engine == "megatron" and s.tp > 1, "zero": s.zero,
           "micro_batches": s.micro_batches, "precision": precision}
    if target == "train":
        out["offload"] = s.offload
    return out


def degree_mismatches(target: str, planned: Mapping[str, Any], ran: Mapping[str, Any]
                      ) -> list[str]:
    """`key planned->ran` for each degree that differs (fast is hf for forward/train: the
    same modules, its own generate only; an unreported offload is 0; outside training,
    ZeRO-1/2 are 0: they shard only optimizer state and gradients)."""
    def norm(k: str, v: Any) -> Any:
        if k == "engine" and v == "fast" and target != "generate":
            return "hf"
        if k == "zero" and target != "train" and v in (1, 2):
            return 0
        return 0 if k == "offload" and v is None else v

    return [f"{k} {planned[k]}->{ran.get(k)}" for k in planned
            if norm(k, planned[k]) != norm(k, ran.get(k))]


def degrees_text(degrees: Mapping[str, Any]) -> str:
    """`engine=megatron dp=1 tp=2 ...` in DEGREES order (what a trace records)."""
    return " ".join(f"{k}={degrees[k]}" for k in DEGREES if k in degrees)


def parse_degrees(text: str) -> dict[str, Any]:
    """Inverse of degrees_text."""
    out: dict[str, Any] = {}
    for part in text.split():
        k, _, v = part.partition("=")
        out[k] = int(v) if v.lstrip("-").isdigit() else {"True": True,
                                                          "False": False}.get(v, v)
    return out


__all__ = ["ENGINES", "DEGREES", "can_run", "able", "resolve_engines", "with_engines",
           "leading_call", "shared_strategy", "planned_degrees", "degree_mismatches",
           "degrees_text", "parse_degrees"]
