"""assign-devices: a mesh and a parallel strategy for every model call.

Builds the placement problem (search.py) from the graph, runs the chosen policy
(policies.py) with the user's pins, and annotates each call node with its Placement,
each node with its Timing in the predicted schedule and the graph with its Schedule
(graphrl/schedule.py): everything the later passes and lower read. Ops stay on the host
(no placement).

Placements already in the graph are inputs: a placed graph read back from its text
(perhaps edited by hand) keeps every placement it states — each call's mesh and whole
strategy — and is scheduled as it is (with the streaming factor its schedule line
states), so a dumped placed graph gives back the plan it was dumped from, and an edited
one the plan of its edit. Under policy auto, the finalists of the search are ranked by
running the rest of the pipeline (ctx.rest) on each and simulating the plan it lowers to.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from graphrl.cluster import ClusterSpec
from graphrl.errors import UsageError
from graphrl.graph import CALL, Graph, Node, Placement
from graphrl.nearest import suggest
from graphrl.parallel import DeviceMesh
from graphrl.schedule import Schedule, Timing

from .context import PassContext, SearchResult
from .insert_reshard import strip_reshards
from .policies import (POLICIES, STREAMS, auto_finalists, hardest_call, run_policy,
                       smallest_cluster)
from .search import CallInfo, Evaluation, Infeasible, Pin, Problem

PIN_KEYS = ("gpus", "tp", "pp", "dp", "zero", "micro_batches", "recompute", "offload",
            "engine")


def unit_of(n: Node, graph: Graph | None = None) -> str:
    """What a call's memory and mesh belong to: its model's engine (`<model>.generate`
    for a generate call's own copy); with `graph`, a shared base's (graphrl.lora) calls
    belong to its owner's engine."""
    if n.target == "generate":
        return f"{n.model}.generate"
    return graph.weights_owner(n.model) if graph is not None else n.model


def call_infos(graph: Graph) -> list[CallInfo]:
    producers = graph.producers()
    out = []
    for n in graph.nodes:
        deps = tuple(dict.fromkeys(producers[i].name for i in n.inputs if i in producers))
        if n.kind != CALL:
            out.append(CallInfo(n.name, n.call, n.model, "", "op", deps=deps))
            continue
        data = [graph.value(i).spec for i in n.inputs if not graph.value(i).spec.is_weights]
        if n.target == "generate":
            prompts = data[0]
            out.append(CallInfo(n.name, n.call, n.model, unit_of(n), "generate",
                                n.outputs[0].spec.batch, prompts.seq,
                                int(n.attr("max_new_tokens")), deps))
        else:
            batch, steps = data[0].batch, 1
            if n.target == "train":  # each minibatch is one optimizer step (and gradient sync)
                minibatches = max(1, int(n.attr("minibatches", 1)))
                batch, steps = max(1, batch // minibatches), int(n.attr("epochs", 1)) * minibatches
            # a shared base (graphrl.lora) runs on its owner's engine: that model's unit,
            # tied to its leading call, holding no weights of its own
            out.append(CallInfo(n.name, n.call, graph.weights_owner(n.model),
                                unit_of(n, graph), n.target, batch,
                                data[0].seq, 0, deps, steps))
    return out


def fixed_engines(graph: Graph, pins: Mapping[str, Pin]) -> dict[str, str]:
    """Model -> the engine its forward/train calls must use: pinned on one of them
    (placement `engine:`), else declared on the model when not hf/fast (graphrl.engines);
    the placement search chooses the others'."""
    out = {m.name: m.engine for m in graph.models if m.engine not in ("hf", "fast")}
    for n in graph.calls():
        pin = pins.get(n.call)
        if pin is not None and pin.engine and n.target != "generate":
            out[n.model] = pin.engine
    return out


def engine_efficiency() -> dict[str, float]:
    """Measured engine efficiencies (graphrl.engine_cost) from this checkout's
    benchmarks/data; {} where none were measured."""
    from pathlib import Path

    from graphrl.engine_cost import ENGINE_EFFICIENCY_FILE, load_engine_efficiency

    return load_engine_efficiency(Path(__file__).resolve().parents[1] / ENGINE_EFFICIENCY_FILE)


def problem_from_graph(graph: Graph, ctx: PassContext,
                       pins: Mapping[str, Pin] | None = None) -> Problem:
    """The placement problem of the graph's step under the context's options; `pins`
    default to the context's (the user's)."""
    pins = ctx.pins if pins is None else pins
    specs = {m.name: m.spec for m in graph.models}
    problem = Problem(call_infos(graph), specs, ctx.cluster, ctx.gen_engine, ctx.params,
                      pins, ctx.lengths, ctx.headroom, fixed_engines(graph, pins),
                      engine_efficiency())
    if ctx.progress is not None:
        sink = ctx.progress
        problem.on_evaluate = lambda count: sink("assign-devices", count)
    return problem


def parse_pins(entries: Mapping[str, Mapping[str, Any]], graph: Graph,
               cluster: ClusterSpec) -> dict[str, Pin]:
    """Placement-file entries (`policy.train: {gpus: "0-15", dp: 16, zero: 3}`) -> Pins,
    with errors naming the entry."""
    calls = {n.call: n for n in graph.calls()}
    pins: dict[str, Pin] = {}
    for call, entry in entries.items():
        if call not in calls:
            raise UsageError(f"placement {call!r}: no such call in @{graph.name}"
                             f"{suggest(call, calls)} (calls: {', '.join(calls)})")
        if not isinstance(entry, Mapping):
            raise UsageError(f"placement {call!r}: expected a mapping of {', '.join(PIN_KEYS)}")
        bad = sorted(set(entry) - set(PIN_KEYS))
        if bad:
            raise UsageError(f"placement {call!r}: unknown key(s) {', '.join(bad)} "
                             f"(known: {', '.join(PIN_KEYS)})")
        mesh = None
        if "gpus" in entry:
            g = entry["gpus"]
            try:
                mesh = (DeviceMesh.parse(g) if isinstance(g, str) else
                        DeviceMesh((int(g),)) if isinstance(g, int) else DeviceMesh(tuple(map(int, g))))
            except ValueError as e:
                raise UsageError(f"placement {call!r}: bad gpus {g!r}: {e}") from None
            if max(mesh.gpus) >= cluster.num_gpus or min(mesh.gpus) < 0:
                raise UsageError(f"placement {call!r}: gpus {mesh.text()} outside the cluster "
                                 f"{cluster.text()} (GPUs 0-{cluster.num_gpus - 1})")
        engine = str(entry.get("engine", ""))
        if engine:
            from graphrl.engines import ENGINES

            if engine not in ENGINES:
                raise UsageError(f"placement {call!r}: unknown engine {engine!r} (known: "
                                 f"{', '.join(ENGINES)})")
        try:
            fields = tuple(sorted((k, int(v)) for k, v in entry.items()
                                  if k not in ("gpus", "engine")))
        except (TypeError, ValueError):
            bad = sorted(k for k, v in entry.items()
                         if k not in ("gpus", "engine") and not _is_int(v))
            raise UsageError(f"placement {call!r}: {', '.join(bad)} must be an integer, got "
                             f"{', '.join(repr(entry[k]) for k in bad)}") from None
        f = dict(fields)
        if mesh is not None and {"tp", "pp", "dp"} <= set(f) and f["tp"] * f["pp"] * f["dp"] != mesh.size:
            raise UsageError(f"placement {call!r}: dp {f['dp']} x tp {f['tp']} x pp {f['pp']} "
                             f"= {f['tp'] * f['pp'] * f['dp']}, not the {mesh.size} GPUs it "
                             f"is pinned to ({mesh.text()})")
        pins[call] = Pin(mesh, fields, engine)
    units: dict[str, DeviceMesh] = {}
    for call, pin in pins.items():
        u = unit_of(calls[call], graph)
        if pin.mesh is not None:
            if u in units and units[u] != pin.mesh:
                raise UsageError(f"placement {call!r}: gpus {pin.mesh.text()} differ from "
                                 f"{units[u].text()} pinned for another call of {u}; a "
                                 "model's forward and train share one mesh")
            units[u] = pin.mesh
    return pins


def _is_int(v: Any) -> bool:
    try:
        int(v)
    except (TypeError, ValueError):
        return False
    return True


def infeasible_error(problem: Problem, e: Infeasible, policy: str) -> UsageError:
    c = problem.cluster
    nodes = smallest_cluster(problem, policy)
    hint = (f"; the smallest cluster that fits: {nodes}x{c.gpus_per_node}x{c.gpu.name}"
            if nodes else "")
    if e.host:
        return UsageError(f"no placement fits on {c.text()}: {e} (after {problem.headroom:.0%} "
                          f"headroom){hint}")
    if e.need:
        headroom = f" after {problem.headroom:.0%} headroom" if problem.headroom else ""
        return UsageError(f"no placement fits on {c.text()}: {e.call} needs "
                          f"{e.need / 2**30:.1f} GiB per GPU at best (on {e.mesh_size} "
                          f"GPU{'s' if e.mesh_size != 1 else ''}), the most one {c.gpu.name} "
                          f"offers is {e.have / 2**30:.1f} GiB{headroom}{hint}")
    return UsageError(f"no placement fits on {c.text()} under policy {policy}{hint}")


def placement_pins(graph: Graph, pins: Mapping[str, Pin]) -> dict[str, Pin]:
    """The user's pins plus, for every call the graph already places, a pin of its mesh
    and whole strategy. A generation mesh that insert-reshard reordered on its model's
    training GPUs is pinned as the training mesh (the search's view of it)."""
    out = dict(pins)
    placed: set[str] = set()   # calls pinned from the graph's placements below
    train_mesh = {n.model: n.placement.mesh for n in graph.calls()
                  if n.target != "generate" and n.placement is not None}
    for n in graph.calls():
        if n.placement is None:
            continue
        mesh = n.placement.mesh
        own = train_mesh.get(n.model)
        if n.target == "generate" and own is not None and own.gpu_set == mesh.gpu_set:
            mesh = own
        user = pins.get(n.call)
        if user is not None and user.mesh is not None and user.mesh.gpu_set != mesh.gpu_set:
            raise UsageError(f"placement {n.call!r}: pinned to GPUs {user.mesh.text()}, but "
                             f"the graph places {n.name} on {n.placement.mesh.text()}")
        strategy = n.placement.strategy
        if strategy.world != mesh.size:
            raise UsageError(f"node {n.name} ({n.call}): dp {strategy.dp} x tp {strategy.tp}"
                             f" x pp {strategy.pp} = {strategy.world}, not the {mesh.size} "
                             f"GPUs it is placed on ({n.placement.mesh.text()})")
        others = out[n.call].node_strategies if n.call in placed else ()   # same call's
        out[n.call] = Pin(mesh, (), "", strategy, (*others, (n.name, strategy)))
        placed.add(n.call)
    units: dict[str, Node] = {}
    for n in graph.calls():   # a unit's calls share one mesh (see search.py)
        if n.placement is None:
            continue
        first = units.setdefault(unit_of(n, graph), n)
        if out[n.call].mesh.gpu_set != out[first.call].mesh.gpu_set:
            raise UsageError(f"node {n.name} ({n.call}) is placed on "
                             f"{n.placement.mesh.text()}, {first.name} ({first.call}) on "
                             f"{first.placement.mesh.text()}: a model's forward and train "
                             "calls share one mesh")
    return out


def schedule_of(ev: Evaluation, ctx: PassContext, policy: str) -> Schedule:
    """The graph-wide schedule line of a placement the search evaluated."""
    return Schedule(ctx.cluster.text(), ctx.gen_engine,
                    ctx.lengths.exact_text() if ctx.lengths is not None else "",
                    ctx.headroom, policy, ev.stream, tuple(ev.offloaded_gpus),
                    ev.step_seconds)


@dataclass(frozen=True)
class AssignDevices:
    policy: str = "auto"
    name: str = "assign-devices"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r} (known: {', '.join(POLICIES)})")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        graph = strip_reshards(graph)   # a placed graph's: insert-reshard plans them anew
        calls = list(graph.calls())
        placed = bool(calls) and all(n.placement is not None for n in calls)
        pins = placement_pins(graph, ctx.pins)
        problem = problem_from_graph(graph, ctx, pins)
        for call, pin in ctx.pins.items():
            if pin.mesh is not None:
                name = next(n.name for n in graph.calls() if n.call == call)
                if not problem.fits(name, pin.mesh.size):
                    why = problem._choice(name, pin.mesh.size)
                    if not why.need:  # no candidate strategy at all, memory aside
                        why = (f"no dp x tp x pp split of {pin.mesh.size} GPU(s) suits "
                               f"{call} (tp must divide the heads and stay in a node, "
                               "pp the layers, dp the batch)")
                    raise UsageError(f"placement {call!r}: {why}"
                                     f" (pinned to GPUs {pin.mesh.text()} with "
                                     f"{dict(pin.fields) or 'no strategy fields'})")
        policy = graph.schedule.policy if placed and graph.schedule else self.policy
        try:
            if placed:
                ev = _as_placed(graph, problem)
            elif self.policy == "auto":
                ev = _fastest_lowered(graph, problem, ctx, auto_finalists(problem))
            else:
                ev = run_policy(problem, self.policy)
        except Infeasible as e:
            raise infeasible_error(problem, e, self.policy) from None
        ctx.search = SearchResult(problem, ev)
        return placed_graph(graph, ev, schedule_of(ev, ctx, policy), ctx.pins)


def _as_placed(graph: Graph, problem: Problem) -> Evaluation:
    """The schedule of a graph that places every call (its pins say where and how): at
    its schedule line's streaming factor, else the fastest of STREAMS."""
    units = {unit_of(n, graph): n.call for n in graph.calls()}
    assignment = {u: problem.pins[call].mesh for u, call in units.items()}
    streams = (graph.schedule.stream,) if graph.schedule is not None else STREAMS
    best = None
    for st in streams:
        ev = problem.evaluate(assignment, st)
        if best is None or ev.step_seconds < best.step_seconds - 1e-12:
            best = ev
    return best


def placed_graph(graph: Graph, ev: Evaluation, schedule: Schedule,
                 pins: Mapping[str, Pin] | None = None) -> Graph:
    """The graph with each call node annotated with its mesh and strategy from `ev` (a
    pinned engine named in the strategies of its model's calls, graphrl.engines), each
    scheduled node with its Timing, and the graph with `schedule`."""
    from graphrl.engines import with_engines

    sched = {s.name: s for s in ev.schedule}
    resident = dict(ev.resident)
    nodes = []
    for n in graph.nodes:
        s = sched.get(n.name)
        if s is None:
            nodes.append(replace(n, timing=None))
            continue
        if s.choice is None:
            timing = Timing(s.start, s.end, s.end - s.start)
        else:
            timing = Timing(s.start, s.end, s.choice.seconds, s.choice.peak_bytes,
                            resident.get(unit_of(n), 0), s.offload_seconds)
        placement = (Placement(s.mesh, s.choice.strategy) if s.choice is not None
                     else n.placement)
        nodes.append(replace(n, placement=placement, timing=timing))
    out = replace(graph.with_nodes(nodes), schedule=schedule)
    return with_engines(out, pins or {})
def _fastest_lowered(graph: Graph, problem: Problem, ctx: PassContext,
                     finalists: list[Evaluation]) -> Evaluation:
    """The finalist whose plan, made by the rest of the pipeline (ctx.rest), simulates
    fastest (the first on ties). The search estimates each placement; lowering adds what
    it leaves out (onload/offload order, streamed transfers), which can reorder close
    finalists. The ranking runs the declared passes in a scratch context (ctx.ranking:
    insert-reshard costs reshards by their closed form above RANKING_EXACT_GPUS). When
    the rest of the pipeline does not lower, the search's estimates rank them."""
    from graphrl.plan import Plan

    if not finalists:
        raise hardest_call(problem)
    if len(finalists) == 1:
        return finalists[0]

    def seconds(ev: Evaluation) -> float:
        scratch = ctx.scratch()
        ir: Any = placed_graph(graph, ev, schedule_of(ev, ctx, "auto"), ctx.pins)
        for k, p in enumerate(ctx.rest):
            scratch.rest = ctx.rest[k + 1:]
            ir = p.run(ir, scratch)
        return ir.predicted_step_seconds if isinstance(ir, Plan) else ev.step_seconds

    times = [seconds(ev) for ev in finalists]
    return finalists[times.index(min(times))]
