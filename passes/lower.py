"""lower: a placed, resharded graph -> per-worker instruction streams (a Plan).

Rules:
- a call runs as a gang on every GPU of its mesh; ops run on the host (worker -1);
- a data value moves only between meshes: the producer mesh's first GPU (or the host)
  sends it to the consumer mesh's first GPU, which shares it inside its mesh as part of
  the run; weights never move as data, only through reshard gangs;
- on GPUs where colocated models do not fit together (choose-overlap), each call onloads
  its model before and offloads it after;
- with streaming (k micro-batches), the generate run and the runs of forward calls on
  other meshes are split into k parts, part i of a consumer after part i of the rollouts;
- a value is freed on a worker after its last use there;
- a streamed async step the compiler priced (generate's `head_seconds`) runs its head,
  the push, its tail and the early parts of `head_part` calls as the executors do
  (passes/lower_stream.py);
- instructions are emitted in the order of the search's schedule: each run (part) at its
  predicted start, each transfer as soon as its value (part) is ready there. A send and
  its recv are emitted together, as are a gang's runs, so all streams meet transfers and
  gangs in one global order (no deadlock), and a sender never waits behind its mesh's
  later calls.
Durations come from the search's cost model, read from the graph alone: each node's
Timing, the graph's Schedule (graphrl/schedule.py) and each reshard node's `sent`
bytes, so a placed graph printed, parsed back and lowered gives the same plan. The
plan's predicted step is `simulate` of its instruction streams.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from graphrl.cluster import ClusterSpec
from graphrl.errors import GraphRLError, UsageError
from graphrl.graph import Graph, Node
from graphrl.plan import HOST, Plan, StreamBuilder
from graphrl.schedule import gpus_text

from .context import PassContext
from .insert_reshard import parse_sent
from .lower_stream import StreamSplit, lower_stream_end, run_part, stream_split


def _bandwidth(cluster: ClusterSpec, src: int, dst: int) -> float:
    if HOST in (src, dst):
        return cluster.gpu.host_bw
    return cluster.bandwidth(src, dst)


class _Lowering:
    def __init__(self, graph: Graph, cluster: ClusterSpec):
        self.g, self.cluster = graph, cluster
        schedule = graph.schedule
        self.sched = {n.name: n.timing for n in graph.nodes if n.timing is not None}
        self.resident = {self.unit(n): n.timing.resident_bytes for n in graph.nodes
                         if n.placement is not None and n.timing is not None}
        self.offloaded = set(schedule.offloaded_gpus)
        self.stream = schedule.stream
        self.sb = StreamBuilder()
        self.where: dict[str, tuple[int, ...]] = {v.name: (HOST,) for v in graph.inputs}
        self.made: dict[tuple[str, int], str] = {}   # (value, worker) -> instr id holding it
        self.part_made: dict[tuple[str, int, str], str] = {}  # streamed parts
        self.dead = graph.last_uses()
        producers = self.producers = graph.producers()
        self.consumers = graph.consumers()
        # queued transfers: (ready at, sequence, value, destination worker, part)
        self.pending: list[tuple[float, int, str, int, str]] = []
        self.runs: dict[int, list[tuple[float, float]]] = {}  # GPU -> busy (start, end)
        for n in graph.nodes:
            if n.placement is not None and n.timing is not None:
                for gpu in n.placement.mesh.gpus:
                    self.runs.setdefault(gpu, []).append((n.timing.start, n.timing.end))
        self.gens = {n.name for n in graph.nodes if n.target == "generate"}
        self.streamed = {   # inference readers only: training takes the whole batch
            n.name for n in graph.nodes
            if self.stream > 1 and n.target == "forward" and any(
                i in producers and producers[i].name in self.gens
                and not producers[i].placement.mesh.overlaps(n.placement.mesh)
                for i in n.inputs)}
        if self.streamed:
            self.streamed |= self.gens
        self.split = stream_split(graph)   # a priced streamed async step (lower_stream)

    def workers(self, n: Node) -> tuple[int, ...]:
        return n.placement.mesh.gpus if n.placement is not None else (HOST,)

    def unit(self, n: Node) -> str:
        return f"{n.model}.generate" if n.target == "generate" else n.model

    def bring(self, value: str, dst: int, part: str = "") -> str | None:
        """Make `value` present on worker dst; returns the instr id to wait for."""
        if (value, dst) in self.made and not part:
            return self.made[(value, dst)]
        if part and (value, dst, part) in self.part_made:
            return self.part_made[(value, dst, part)]  # each part crosses once per worker
        src = self.where[value][0]
        spec = self.g.value(value).spec
        nbytes = spec.nbytes // (self.stream if part else 1)
        label = f"{value}" + (f"[{part}]" if part else "")
        dep = self.part_made.get((value, src, part)) or self.made.get((value, src))
        send = self.sb.add(src, "send", value=label, peer=dst, nbytes=nbytes,
                           seconds=nbytes / _bandwidth(self.cluster, src, dst),
                           label=f"send {label}", deps=(dep,) if dep else ())
        recv = self.sb.add(dst, "recv", value=label, peer=src, nbytes=nbytes,
                           seconds=send.seconds, label=f"recv {label}")
        if part:
            self.part_made[(value, dst, part)] = recv.id
        else:
            self.made[(value, dst)] = recv.id
        return recv.id

    def parts(self, n: Node) -> int:
        return self.stream if n.name in self.streamed else 1

    def run_part(self, n: Node, k: int, parts: int, seconds: float) -> tuple[str, float]:
        """(label, seconds) of part k of n's run: a micro-batch, or a streamed async
        step's head / rest part (passes/lower_stream.py)."""
        return run_part(self.split, n, k, parts, seconds)

    def lower_stream_end(self, split: StreamSplit) -> None:
        """The push, generation's tail and the early parts (passes/lower_stream.py)."""
        lower_stream_end(self, split)

    def lower_part(self, n: Node, k: int) -> None:
        """Part k of n's run (all of it when n is not streamed); the node's offload, its
        outgoing transfers and frees follow its last part."""
        workers = self.workers(n)
        if n.target == "reshard":
            return self.lower_reshard(n)
        leader = workers[0]
        parts = self.parts(n)
        seconds, mem = self.cost(n)
        part, part_seconds = self.run_part(n, k, parts, seconds)
        deps: list[str] = []
        for i in n.inputs:
            if self.g.value(i).spec.is_weights:
                continue
            if set(self.where[i]) == set(workers):
                dep = self.made.get((i, leader))
            else:
                streamed_in = part and self._produced_by_gen(i)
                dep = self.bring(i, leader, part if streamed_in else "")
            if dep:
                deps.append(dep)
        for w in workers:
            if w in self.offloaded and k == 0:
                self.sb.add(w, "onload", model=n.model, node=n.name,
                            seconds=self.resident.get(self.unit(n), 0) / self.cluster.gpu.host_bw,
                            label=f"onload {n.model}")
            run = self.sb.add(w, "run", node=n.name, model=n.model, label=n.call,
                              seconds=part_seconds, mem=mem, deps=tuple(deps), part=part)
            for v in n.outputs:
                self.made[(v.name, w)] = run.id
                if part:
                    self.part_made[(v.name, w, part)] = run.id
        for v in n.outputs:
            self.where[v.name] = workers
        if part and n.name in self.gens:  # rollout part k goes to its streamed readers
            for v in n.outputs:
                for c in self.consumers.get(v.name, ()):
                    if c.name in self.streamed and not set(self.workers(c)) & set(workers):
                        self.pending.append((self.part_end(n, k), len(self.pending), v.name,
                                             self.workers(c)[0], part))
        if k == parts - 1:
            self.finish(n)

    def finish(self, n: Node) -> None:
        workers = self.workers(n)
        self.send_ahead(n)
        for w in workers:
            if w in self.offloaded:
                self.sb.add(w, "offload", model=n.model, node=n.name,
                            seconds=self.resident.get(self.unit(n), 0) / self.cluster.gpu.host_bw,
                            label=f"offload {n.model}")
        for value in self.dead.get(n.name, ()):
            for w in workers + tuple(x for (val, x) in self.made if val == value
                                      and x not in workers):
                if (value, w) in self.made:
                    self.sb.add(w, "free", value=value, label=f"free {value}")
                    del self.made[(value, w)]

    def send_ahead(self, n: Node) -> None:
        """Queue n's outputs for the other meshes that read them: they move when n ends
        in the search's schedule (see plan), not when a reader is lowered; streamed
        rollouts move part by part (lower_part)."""
        end = self.sched[n.name].end if n.name in self.sched else 0.0
        for v in n.outputs:
            if v.spec.is_weights:
                continue
            for c in self.consumers.get(v.name, ()):
                if c.target == "reshard" or (c.name in self.streamed and n.name in self.gens):
                    continue
                dst = self.workers(c)
                if set(dst) != set(self.where[v.name]):
                    at = self.idle_time(end, self.where[v.name][0], dst[0], self.part_start(c, 0))
                    self.pending.append((at, len(self.pending), v.name, dst[0], ""))

    def idle_time(self, ready: float, src: int, dst: int, needed: float) -> float:
        """The first time from `ready` to `needed` at which neither end of a transfer is
        inside a run of the search's schedule (a send meets its recv: if either end were
        busy, the other would wait); `ready` if there is none."""
        t = ready
        while t <= needed + 1e-12:
            ends = [e for w in (src, dst) for s, e in self.runs.get(w, ())
                    if s < t - 1e-12 and t < e - 1e-12]
            if not ends:
                return t
            t = max(ends)
        return ready

    def flush(self, until: float) -> None:
        """Emit the queued transfers of values produced by `until`, earliest first."""
        self.pending.sort()
        while self.pending and self.pending[0][0] <= until + 1e-12:
            _, _, value, dst, part = self.pending.pop(0)
            self.bring(value, dst, part)

    # -- the order instructions are emitted in ---------------------------------------------
    def part_end(self, gen: Node, k: int) -> float:
        s = self.sched[gen.name]
        return s.start + (k + 1) * (s.end - s.start) / self.parts(gen)

    def part_start(self, n: Node, k: int) -> float:
        """When part k of n starts in the search's schedule (search.py: a streamed reader
        starts with the first part of the rollouts and keeps pace with them)."""
        s = self.sched.get(n.name)
        if s is None:   # a reshard: when its weights exist (step inputs: at the start)
            return max((self.sched[p.name].end for p in map(self.producers.get, n.inputs)
                        if p is not None and p.name in self.sched), default=-1.0)
        parts = self.parts(n)
        if parts == 1:
            return s.start
        if n.name in self.gens:
            return s.start + k * (s.end - s.start) / parts
        dur = (s.seconds if n.placement is not None else 0.0) + s.offload_seconds
        gens = [self.producers[i] for i in n.inputs
                if self._produced_by_gen(i) and not self.producers[i].placement.mesh.overlaps(
                    n.placement.mesh)]
        return max(s.start + k * dur / parts, self.part_end(gens[0], k))

    def order(self) -> list[Node]:
        """Nodes in the order of the search's predicted start times (a topological order;
        ties and unscheduled nodes, such as reshards, in graph order first)."""
        index = {n.name: k for k, n in enumerate(self.g.nodes)}
        start = {n.name: self.part_start(n, 0) for n in self.g.nodes}
        waits = {n.name: {self.producers[i].name for i in n.inputs if i in self.producers}
                 for n in self.g.nodes}
        users: dict[str, list[str]] = {}
        for name, deps in waits.items():
            for d in deps:
                users.setdefault(d, []).append(name)
        ready = [(start[k], index[k], k) for k, deps in waits.items() if not deps]
        heapq.heapify(ready)
        out = []
        while ready:
            _, _, name = heapq.heappop(ready)
            out.append(self.g.node(name))
            for u in users.get(name, ()):
                waits[u].discard(name)
                if not waits[u]:
                    heapq.heappush(ready, (start[u], index[u], u))
        return out

    def _produced_by_gen(self, value: str) -> bool:
        p = self.producers.get(value)
        return p is not None and p.name in self.gens

    def lower_reshard(self, n: Node) -> None:
        sent = parse_sent(n.attr("sent", ""))
        src_text = str(n.attr("src", ""))
        src_gpus = _gpus_of(src_text)
        gang = tuple(sorted(set(src_gpus) | set(n.placement.mesh.gpus)))
        mesh_bw = self.cluster.group_bandwidth(gang)
        seconds = int(n.attr("max_link_bytes", 0)) / mesh_bw
        for w in gang:
            self.sb.add(w, "reshard", node=n.name, model=n.model, nbytes=sent.get(w, 0),
                        seconds=seconds,
                        label=f"reshard {n.model}")
        for v in n.outputs:
            self.where[v.name] = n.placement.mesh.gpus

    def cost(self, n: Node) -> tuple[float, int]:
        s = self.sched.get(n.name)
        if s is None:
            return 0.0, 0
        return s.seconds, s.peak_bytes

    def plan(self, policy: str) -> Plan:
        """Emit every node part in the order of its predicted start (ties: topological
        order), each queued transfer as soon as its value exists in that schedule. A
        send and its recv are emitted together, as are a gang's runs, so every stream
        meets them in one global order: the plan cannot deadlock."""
        rank = {n.name: r for r, n in enumerate(self.order())}
        items = sorted((self.part_start(n, k), rank[n.name], k, n.name)
                       for n in self.g.nodes for k in range(self.parts(n)))
        last = {name: i for i, (_, _, _, name) in enumerate(items)}
        self.dead = self.g.with_nodes(self.g.node(name) for name in sorted(last, key=last.get)
                                      ).last_uses()
        split = self.split
        for start, _, k, name in items:
            if split is not None and name == split.push:
                continue   # the push comes after the step's other work (lower_stream_end)
            self.flush(start)
            self.lower_part(self.g.node(name), k)
        self.flush(math.inf)
        if split is not None:
            self.lower_stream_end(split)
        resident = set()
        for n in self.g.nodes:   # a policy's generation copy is its own unit
            if n.placement is not None and n.timing is not None and n.timing.resident_bytes:
                resident.update((gpu, self.unit(n), n.timing.resident_bytes)
                                for gpu in n.placement.mesh.gpus)
        notes = (("stream", str(self.stream)),
                 ("offloaded_gpus", gpus_text(tuple(sorted(self.offloaded)))),
                 ("search_step_seconds", f"{self.g.schedule.search_step_seconds:.6f}"))
        plan = Plan(self.g, self.cluster, policy, self.sb.build(), 0.0,
                    tuple(sorted(resident)), notes)
        from graphrl.simulate import simulate

        _, step = simulate(plan)
        return Plan(plan.graph, plan.cluster, plan.policy, plan.streams, step, plan.resident,
                    plan.notes)


def _gpus_of(src: str) -> tuple[int, ...]:
    from graphrl.parallel import DeviceMesh

    mesh_text = src.split(":", 1)[0]
    return DeviceMesh.parse(mesh_text).gpus if mesh_text else ()


def lower(graph: Graph, cluster: ClusterSpec) -> Plan:
    """The Plan of a placed graph (assign-devices, choose-overlap and insert-reshard have
    run, or its text was read back): it reads nothing but the graph. Refuses a graph
    without a schedule, or placed for another cluster than `cluster`."""
    if graph.schedule is None:
        raise GraphRLError(f"graph @{graph.name} has no schedule line: lower needs a placed "
                           "graph (run assign-devices first)")
    if graph.schedule.cluster != cluster.text():
        raise UsageError(f"graph @{graph.name} was placed for {graph.schedule.cluster}, not "
                         f"{cluster.text()}")
    missing = [n.name for n in graph.calls() if n.placement is None or n.timing is None]
    if missing:
        raise GraphRLError(f"graph @{graph.name}: {', '.join(missing)} not placed and "
                           "scheduled: lower needs every call placed (assign-devices)")
    return _Lowering(graph, cluster).plan(graph.schedule.policy)


@dataclass(frozen=True)
class Lower:
    """The last pass: the placed graph -> its Plan (per-worker instruction streams),
    whose predicted step is the simulation of those streams. With `ctx.engines` it first
    refuses a strategy no engine of graphrl runs (graphrl.engines)."""

    name: str = "lower"

    def run(self, graph: Graph, ctx: PassContext) -> Plan:
        if ctx.engines:
            from graphrl.engines import resolve_engines

            resolve_engines(graph)
        return lower(graph, ctx.cluster)


__all__ = ["lower", "Lower"]
