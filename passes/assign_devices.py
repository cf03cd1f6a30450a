"""assign-devices: a mesh and a parallel strategy for every model call.

Builds the placement problem (search.py) from the graph, runs the chosen policy
(policies.py) with the user's pins, and annotates each call node with its Placement.
Ops stay on the host (no placement).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from graphrl.cluster import ClusterSpec
from graphrl.errors import UsageError
from graphrl.graph import CALL, Graph, Node, Placement
from graphrl.nearest import suggest
from graphrl.parallel import DeviceMesh

from .base import PassContext
from .policies import POLICIES, auto_finalists, hardest_call, run_policy, smallest_cluster
from .search import CallInfo, Evaluation, Infeasible, Pin, Problem

EXACT_FINALIST_GPUS = 16   # finalists are lowered with exact reshard plans up to this size
PIN_KEYS = ("gpus", "tp", "pp", "dp", "zero", "micro_batches", "recompute", "offload",
            "engine")


def unit_of(n: Node) -> str:
    return f"{n.model}.generate" if n.target == "generate" else n.model


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
            out.append(CallInfo(n.name, n.call, n.model, unit_of(n), n.target, batch,
                                data[0].seq, 0, deps, steps))
    return out


def problem_from_graph(graph: Graph, ctx: PassContext) -> Problem:
    specs = {m.name: m.spec for m in graph.models}
    problem = Problem(call_infos(graph), specs, ctx.cluster, ctx.gen_engine, ctx.params,
                      ctx.pins, ctx.lengths, ctx.headroom)
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
        u = unit_of(calls[call])
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


@dataclass(frozen=True)
class AssignDevices:
    policy: str = "auto"
    name: str = "assign-devices"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if self.policy not in POLICIES:
            raise UsageError(f"unknown policy {self.policy!r} (known: {', '.join(POLICIES)})")
        problem = problem_from_graph(graph, ctx)
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
        try:
            if self.policy == "auto":
                ev = _fastest_lowered(graph, problem, ctx, auto_finalists(problem))
            else:
                ev = run_policy(problem, self.policy)
        except Infeasible as e:
            raise infeasible_error(problem, e, self.policy) from None
        ctx.findings.update(problem=problem, evaluation=ev, policy=self.policy)
        return placed_graph(graph, ev)


def placed_graph(graph: Graph, ev: Evaluation) -> Graph:
    """The graph with each call node annotated with its mesh and strategy from `ev`."""
    placed = {s.name: s for s in ev.schedule if s.choice is not None}
    return graph.with_nodes(
        replace(n, placement=Placement(placed[n.name].mesh, placed[n.name].choice.strategy))
        if n.name in placed else n for n in graph.nodes)


def _fastest_lowered(graph: Graph, problem: Problem, ctx: PassContext,
                     finalists: list[Evaluation]) -> Evaluation:
    """The finalist whose lowered plan simulates fastest (the first on ties). The search
    estimates each placement; lowering adds what it leaves out (onload/offload order,
    streamed transfers), which can reorder close finalists. Reshards are costed by their
    closed form here above EXACT_FINALIST_GPUS (the exact planner takes seconds on 32
    GPUs with pipeline stages); the pipeline plans the winner's exactly."""
    from .choose_overlap import ChooseOverlap
    from .insert_reshard import InsertReshard
    from .lower import lower

    if not finalists:
        raise hardest_call(problem)
    if len(finalists) == 1:
        return finalists[0]

    # Up to 16 GPUs the exact reshard plans are cheap and decide close calls the way the
    # pipeline will (ppo 7b 128/256 batch 64 on 2x8 H100: 2.616 s vs 2.631 s).
    exact = ctx.cluster.num_gpus <= EXACT_FINALIST_GPUS

    def seconds(ev: Evaluation) -> float:
        scratch = PassContext(ctx.cluster, ctx.gen_engine, ctx.params, ctx.pins, check=False,
                              lengths=ctx.lengths, headroom=ctx.headroom,
                              findings={"problem": problem, "evaluation": ev,
                                        "policy": "auto"})
        g = placed_graph(graph, ev)
        for p in (ChooseOverlap(), InsertReshard(exact=exact)):
            g = p.run(g, scratch)
        return lower(g, scratch).predicted_step_seconds

    times = [seconds(ev) for ev in finalists]
    return finalists[times.index(min(times))]
