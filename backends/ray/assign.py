"""What the Ray executor derives from a Plan before it starts anything (pure; no Ray).

- `assign_engines`: which engines each model needs and on which ranks. A model's
  forward and train calls share one engine on their mesh (the compiler gives them one
  mesh); its generate call reads a separate generation engine `<model>.gen` when a
  reshard node feeds it or its mesh differs, else the same engine. Engine kinds:
  a trainable model whose train placement has ZeRO-3 on more than one GPU trains with
  FSDP2 over its mesh (`fsdp`); one trained on a mesh of more than one GPU with ZeRO 0-2
  keeps a full copy per rank and averages gradients over the mesh after each backward
  (`replicas` with a group: data-parallel, as DDP; optimizer state is replicated, so
  ZeRO-1/2's memory savings are not reproduced); every other engine is a full copy per
  rank (`replicas`). A model whose calls graphrl.engines.resolve_engines gives to
  `megatron` or `deepspeed` gets that engine over its mesh, with the plan's degrees of its
  train call (or first forward call), and the process groups it needs; a strategy no
  engine runs, or a forward call planned with other degrees than its model's shared
  engine runs it with (graphrl.engines.shared_strategy), is refused there, before
  anything starts. LoRA (graphrl.lora): a model with adapters runs on the hf, fast or
  DeepSpeed engine as any other (peft inside FSDP2, the replicas or DeepSpeed ZeRO;
  generation copies hold the frozen base from the same seed or model directory, and
  reshards move the adapters); a shared base (ModelDecl.shares_base: a reference that
  is the policy's frozen base) gets no engine of its own: a `base` spec that runs its
  calls on its owner's engine, on the owner's ranks, with the adapters off (on a
  DeepSpeed owner: a collective of its mesh, the whole batch on every rank, as the
  owner's own calls). Refused here: a shared base whose calls the plan put elsewhere,
  and LoRA on megatron engines (`refuse_lora_engines`).
- `split_rows`: how a call's batch is split over its ranks. Every call runs on every rank
  of its mesh with an equal slice (rank i of n: rows i*B//n to (i+1)*B//n) on HF
  replicas; megatron and DeepSpeed engines take the whole batch and split it by their
  own dp coordinates (tp and pp ranks share rows).
- `dispatch_order`: the plan's instruction groups (gangs, send/recv pairs, single
  instructions; `graphrl.simulate.happens_before`) in one total order that respects every
  happens-before edge, earliest predicted start first. The driver issues them in this
  order, so every rank sees its calls in its stream's order and every gang's members
  see the gang at the same point of their sequences: no collective can wait on a call
  queued behind another collective (the plan is deadlock-free: `verify_plan`).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from graphrl.errors import UsageError
from graphrl.graph import CALL, Graph
from graphrl.plan import Instr, Plan
from graphrl.simulate import happens_before, schedule

from .specs import EngineSpec


@dataclass(frozen=True)
class EnginePlan:
    """The engines of a plan: specs by key, the engine each call node uses, and the
    process groups (name -> ranks) the engines need."""

    specs: Mapping[str, EngineSpec]
    node_engine: Mapping[str, str]
    groups: Mapping[str, tuple[int, ...]]
    gen_engine: Mapping[str, str]     # model -> key of the engine its generate reads
    resolved: Mapping[str, str] = field(default_factory=dict)   # node -> engine name


def _mesh_group(gpus: tuple[int, ...]) -> str:
    return "mesh:" + ",".join(map(str, gpus))


def _engine_groups(kind: str, gpus: tuple[int, ...], s: Any,
                   groups: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """Process groups a megatron / deepspeed engine over `gpus` needs (added to `groups`);
    their names, `<mesh>/<kind>/<i>`."""
    from graphrl.parallel import megatron_groups

    mesh = _mesh_group(gpus)
    groups[mesh] = gpus
    names = [mesh]
    if kind == "megatron":
        lists = megatron_groups(gpus, s.dp, s.tp, s.pp)
    else:   # deepspeed: the mesh is its data-parallel group; one-rank model-parallel groups
        lists = {"self": tuple((g,) for g in gpus)}
    for k, ranks in lists.items():
        for i, r in enumerate(ranks):
            name = f"{mesh}/{k}/{i}"
            groups[name] = r
            names.append(name)
    return tuple(names)


# the engines LoRA runs on with the Ray backend (megatron-core's parallel linears have no
# LoRA: graphrl.architecture.ENGINE_FEATURES, so the compiler never chooses it for one)
LORA_ENGINES = ("hf", "fast", "deepspeed")


def refuse_lora_engines(graph: Graph, chosen: Mapping[str, str]) -> None:
    """UsageError, before any worker starts, for a call of a LoRA model or a shared base
    that `chosen` (node -> engine, graphrl.engines.resolve_engines) gives to an engine
    the Ray workers do not run LoRA on."""
    for n in graph.nodes:
        if n.kind != CALL or chosen.get(n.name, "hf") in LORA_ENGINES:
            continue
        decl = graph.model(n.model)
        what = ("trains LoRA adapters" if decl.spec.lora is not None else
                f"is the shared base of {decl.shares_base}" if decl.shares_base else "")
        if what:
            raise UsageError(
                f"node {n.name} ({n.call}): model {decl.name} {what}; on --backend ray "
                f"LoRA runs on the {', '.join(LORA_ENGINES)} engines, not "
                f"{chosen[n.name]}: it has no LoRA on its parallel linears; pin the call "
                "to engine hf (e.g. zero=3 for FSDP2) or deepspeed")


def _shared_base(decl: Any, calls: list[Any], specs: dict[str, EngineSpec],
                 node_engine: dict[str, str], noop: bool) -> None:
    """The spec of a shared base: its owner's engine kind, ranks and group, run there."""
    owner = specs.get(decl.shares_base)
    meshes = sorted({n.placement.mesh.gpus for n in calls})
    if owner is None or any(m != owner.gpus for m in meshes):
        where = f"GPUs {list(owner.gpus)}" if owner is not None else "no engine"
        raise UsageError(f"model {decl.name}: the shared base of {decl.shares_base} runs "
                         f"on its engine ({where}), but the plan puts its calls on "
                         f"{[list(m) for m in meshes]}; the Ray backend runs a shared base "
                         "only on its owner's engine (tie its calls to the owner's mesh)")
    specs[decl.name] = replace(owner, key=decl.name, decl=decl, options={},
                               kind="noop" if noop else owner.kind, init_from=None,
                               init_checkpoint=None, base="" if noop else owner.key)
    for n in calls:
        node_engine[n.name] = decl.name


def assign_engines(graph: Graph, models: Mapping[str, Any], seed: int = 0,
                   noop: bool = False) -> EnginePlan:
    """`models`: name -> graphrl.Model (engine options and init_from)."""
    from graphrl.engines import resolve_engines

    chosen = resolve_engines(graph, {name: m.engine for name, m in models.items()})
    refuse_lora_engines(graph, chosen)
    specs: dict[str, EngineSpec] = {}
    node_engine: dict[str, str] = {}
    groups: dict[str, tuple[int, ...]] = {}
    gen_engine: dict[str, str] = {}
    resharded = {n.model for n in graph.nodes if n.target == "reshard"}
    for decl in sorted(graph.models, key=lambda d: bool(d.shares_base)):   # owners first
        calls = [n for n in graph.nodes if n.kind == CALL and n.model == decl.name]
        for n in calls:
            if n.placement is None:
                raise UsageError(f"node {n.name} ({n.call}) has no placement: compile the "
                                 "graph before running it on Ray")
        if decl.shares_base:
            _shared_base(decl, calls, specs, node_engine, noop)
            continue
        main = [n for n in calls if n.target != "generate"]
        gens = [n for n in calls if n.target == "generate"]
        model = models[decl.name]
        init_from = models[model.init_from].decl() if model.init_from else None
        init_ckpt = models[model.init_from].checkpoint if model.init_from else None
        if main:
            meshes = {n.placement.mesh.gpus for n in main}
            if len(meshes) > 1:
                raise UsageError(f"model {decl.name}: its forward and train calls run on "
                                 f"different meshes {sorted(meshes)}; the Ray backend keeps "
                                 "one engine per model for them")
            train = next((n for n in main if n.target == "train"), None)
            gpus = main[0].placement.mesh.gpus
            engine = chosen[(train or main[0]).name]
            strategy = (train or main[0]).placement.strategy
            kind, group, names = "replicas", "", ()
            if engine in ("megatron", "deepspeed"):
                kind = engine
            elif train is not None and len(gpus) > 1:
                group = _mesh_group(gpus)
                kind = "fsdp" if train.placement.strategy.zero == 3 else "replicas"
            if noop:
                kind, group = "noop", ""
            if group:
                groups[group] = gpus
            if kind in ("megatron", "deepspeed"):
                names = _engine_groups(kind, gpus, strategy, groups)
            specs[decl.name] = EngineSpec(decl.name, decl, model.engine_options(), kind, gpus,
                                          group, seed, init_from, init_ckpt, engine, strategy,
                                          names)
            for n in main:
                node_engine[n.name] = decl.name
        for n in gens:
            gpus = n.placement.mesh.gpus
            if main and decl.name not in resharded and gpus == specs[decl.name].gpus:
                key = decl.name
            else:
                key = f"{decl.name}.gen" if main else decl.name
                if key in specs and specs[key].gpus != gpus:
                    raise UsageError(f"model {decl.name}: generate calls on different "
                                     "meshes")
                # a generation copy never trains: held in the model's precision only
                gen_decl = replace(decl, trainable=False) if main else decl
                specs[key] = EngineSpec(key, gen_decl, model.engine_options(),
                                        "noop" if noop else "replicas", gpus, "", seed,
                                        init_from, init_ckpt)
            node_engine[n.name] = gen_engine[decl.name] = key
    return EnginePlan(specs, node_engine, groups, gen_engine, chosen)


def split_rows(batch: int, ranks: int, i: int) -> tuple[int, int]:
    """Rows of data-parallel slice i of `ranks` over a batch of `batch` rows."""
    return i * batch // ranks, (i + 1) * batch // ranks


@dataclass(frozen=True)
class Group:
    """Instructions the driver issues together: `op` of the first member."""

    key: str
    op: str
    members: tuple[tuple[int, Instr], ...]

    @property
    def node(self) -> str:
        return self.members[0][1].node

    @property
    def workers(self) -> tuple[int, ...]:
        return tuple(w for w, _ in self.members)


def dispatch_order(plan: Plan) -> tuple[Group, ...]:
    """Every instruction group of `plan`, topologically ordered (see module doc)."""
    hb = happens_before(plan)
    times = schedule(plan)
    index = {n.name: k for k, n in enumerate(plan.graph.nodes)}

    def prio(key: str) -> tuple[float, int, str]:
        members = hb.groups[key]
        node = members[0][1].node
        return (times[key][0], index.get(node, len(index)), key)

    waiting = {k: set(v) for k, v in hb.edges.items()}
    users: dict[str, list[str]] = {k: [] for k in hb.groups}
    for k, deps in hb.edges.items():
        for d in deps:
            users[d].append(k)
    heap = [prio(k) for k, v in waiting.items() if not v]
    heapq.heapify(heap)
    out = []
    while heap:
        *_, key = heapq.heappop(heap)
        members = tuple(hb.groups[key])
        out.append(Group(key, members[0][1].op, members))
        for u in users[key]:
            waiting[u].discard(key)
            if not waiting[u]:
                heapq.heappush(heap, prio(u))
    if len(out) != len(hb.groups):
        raise UsageError("the plan's instructions wait on each other in a cycle")
    return tuple(out)


__all__ = ["EnginePlan", "assign_engines", "refuse_lora_engines", "LORA_ENGINES", "split_rows", "Group", "dispatch_order"]
