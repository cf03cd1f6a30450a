"""The placement problem on plain numbers: calls, meshes, strategies and a step-time model.

A *unit* is what gets a mesh: each model's calls share one mesh (its forward and train),
except that a policy's generation is a unit of its own, so that it may run on the
model's training GPUs (HybridFlow's hybrid engine) or on a pool apart (OpenRLHF's
separate vLLM engines). `Problem.evaluate(assignment)` predicts the step time of one
unit -> mesh assignment by list scheduling the step's nodes:

- every call picks its fastest strategy (dp, tp, pp, micro-batches, ZeRO) that fits a
  GPU on a mesh of that size (the same search for every policy), on an engine that
  executes it; a model's forward calls run its train call's (engine_choice.py);
- calls on overlapping meshes run one after the other, calls on disjoint meshes at the
  same time, each starting when its inputs are ready;
- when the models resident on a GPU do not fit together, each call there onloads its
  model's state from host memory before it runs and offloads it after (verl's and
  DeepSpeed-Chat's offload), paying 2 x state bytes / PCIe bandwidth;
- the policy's new weights move from the training layout to the generation layout at
  the start of the step: the bytes on the busiest link over its bandwidth, with
  zero-redundancy grouping when both share GPUs (HybridFlow §5.4);
- with streaming k > 1, forward calls on meshes disjoint from the generator's start when
  the first of k micro-batches of rollouts is ready (training waits for the whole batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Callable, Mapping

import numpy as np

from graphrl.cluster import ClusterSpec
from graphrl.cost import (CALIBRATED, CostParams, estimate, host_state_bytes,
                          model_state_bytes, reshard_received_bytes)
from graphrl.engines import shared_strategy
from graphrl.lengths import LengthDist
from graphrl.parallel import DeviceMesh, Strategy
from graphrl.types import ModelSpec

from .candidates import candidate_strategies, divisors  # noqa: F401  (re-exported)
from .engine_choice import engine_variants, shared_engine_calls

OP_SECONDS = 1e-3  # host-side ops (advantages, scoring): small, fixed
# Share of each GPU's memory (and each node's host memory) plans leave free: allocator
# fragmentation, NCCL buffers, CUDA context (PyTorch's caching allocator alone commonly
# strands several percent; verl and OpenRLHF default to using <= 90% for the same reason).
DEFAULT_HEADROOM = 0.08


@dataclass(frozen=True)
class CallInfo:
    """One node of the step as the search sees it. Ops have phase "op"."""

    name: str
    call: str
    model: str
    unit: str
    phase: str          # generate | forward | train | op
    batch: int = 0
    seq: int = 0        # prompt length for generate, full length otherwise
    new_tokens: int = 0
    deps: tuple[str, ...] = ()
    repeats: int = 1    # train: optimizer steps (epochs x minibatches), each on `batch`


@dataclass(frozen=True)
class Pin:
    """A user's fixed placement for one call: a mesh and/or strategy fields."""

    mesh: DeviceMesh | None = None
    fields: tuple[tuple[str, int], ...] = ()
    engine: str = ""   # a training/inference engine the user asked for (graphrl.engines)
    strategy: Strategy | None = None   # the whole strategy, as a placed graph states it
    # a placed graph's calls of one name (ReMax's sampled and greedy generate) each keep
    # their own strategy: node name -> strategy, over `strategy`
    node_strategies: tuple[tuple[str, Strategy], ...] = ()

    def strategy_of(self, node: str) -> Strategy | None:
        return dict(self.node_strategies).get(node, self.strategy)


@dataclass(frozen=True)
class Choice:
    strategy: Strategy
    seconds: float
    peak_bytes: int
    resident_bytes: int  # what stays on each GPU between calls (weights / Adam states)


@dataclass(frozen=True)
class Scheduled:
    name: str
    mesh: DeviceMesh | None
    choice: Choice | None
    start: float
    end: float
    offload_seconds: float = 0.0


@dataclass(frozen=True)
class Evaluation:
    assignment: tuple[tuple[str, DeviceMesh], ...]
    step_seconds: float
    schedule: tuple[Scheduled, ...]
    reshard_seconds: float
    reshard_bytes: int
    stream: int
    offloaded_gpus: tuple[int, ...]
    resident: tuple[tuple[str, int], ...] = ()  # unit -> bytes it keeps on each GPU

    def mesh_of(self, unit: str) -> DeviceMesh:
        return dict(self.assignment)[unit]


class Infeasible(Exception):
    """No strategy of a call fits a GPU on the mesh it was given."""

    host = False

    def __init__(self, call: str, mesh_size: int, need_bytes: int, have_bytes: int):
        self.call, self.mesh_size, self.need, self.have = call, mesh_size, need_bytes, have_bytes
        super().__init__(f"{call} does not fit on {mesh_size} GPU(s): needs "
                         f"{need_bytes / 2**30:.1f} GiB per GPU at best, a GPU has "
                         f"{have_bytes / 2**30:.1f} GiB")


class HostMemoryInfeasible(Infeasible):
    """What a placement offloads to host memory overflows a node's RAM."""

    host = True

    def __init__(self, node: int, need_bytes: int, have_bytes: int):
        Exception.__init__(self, f"node {node}'s host RAM: offloaded state needs "
                                 f"{need_bytes / 2**30:.1f} GiB, a node has "
                                 f"{have_bytes / 2**30:.1f} GiB")
        self.call, self.mesh_size, self.need, self.have = f"node {node}", 0, need_bytes, have_bytes
        self.node = node


@lru_cache(maxsize=4096)
def _index(mesh: DeviceMesh) -> slice | list[int]:
    """numpy index of a mesh's GPUs: a slice for a contiguous range."""
    g = mesh.gpus
    return slice(g[0], g[-1] + 1) if g[-1] - g[0] + 1 == len(g) and g == tuple(
        range(g[0], g[-1] + 1)) else list(g)


@dataclass(frozen=True)
class _Layout:
    """A placement's strategies and what follows from them alone (see Problem._layout)."""

    choices: Mapping[str, Choice]
    resident: Mapping[str, int]
    offloaded: frozenset[int]
    reshard_s: float
    reshard_bytes: int
    reshard_gpus: tuple[int, ...]
    assignment: tuple[tuple[str, DeviceMesh], ...] = ()
    lean: dict[float, dict[str, float]] = field(default_factory=dict, compare=False)
    host: tuple[int, int] = (0, 0)   # (node, bytes) of the node offloading the most

    @cached_property
    def offloaded_sorted(self) -> tuple[int, ...]:
        return tuple(sorted(self.offloaded))

    @cached_property
    def resident_sorted(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self.resident.items()))


# Shares of a colocated GPU group's room that leaner strategies may keep resident, tried
# in turn when the fastest strategies overflow it (evenly split among its models).
LEAN_SHARES = (1.0, 0.7)


class Problem:
    """The step's calls on a cluster; caches per-call strategy choices by mesh size."""

    def __init__(self, calls: list[CallInfo], specs: Mapping[str, ModelSpec],
                 cluster: ClusterSpec, gen_engine: str = "hf",
                 params: CostParams = CALIBRATED, pins: Mapping[str, Pin] | None = None,
                 lengths: LengthDist | None = None, headroom: float = DEFAULT_HEADROOM,
                 engines: Mapping[str, str] | None = None,
                 efficiency: Mapping[str, float] | None = None):
        """`engines`: model -> the engine its forward/train calls are fixed to (absent:
        the search chooses); `efficiency`: engine -> tokens/s over HF's
        (graphrl.engine_cost.load_engine_efficiency; absent: 1)."""
        if not 0 <= headroom < 1:
            raise ValueError(f"memory headroom must be in [0, 1), got {headroom!r}")
        self.headroom = headroom
        self.host_failure: HostMemoryInfeasible | None = None   # the refusal needing least
        self.calls = list(calls)
        self.lengths = lengths   # response lengths (None: every one max_new_tokens)
        self.by_name = {c.name: c for c in self.calls}
        self.specs = dict(specs)
        self.cluster = cluster
        self.gen_engine = gen_engine
        self.params = params
        self.pins = dict(pins or {})
        self.engines = dict(engines or {})
        self.efficiency = dict(efficiency or {})
        self._leader, self._followers = shared_engine_calls(self.calls, self.pins)
        self._packed = self._packed_lengths()
        self.units = list(dict.fromkeys(c.unit for c in self.calls if c.phase != "op"))
        self._gen_names = frozenset(c.name for c in self.calls if c.phase == "generate")
        # uneven data-parallel splits over whole nodes (candidate_strategies): on a
        # cluster, or a pinned mesh (an async plan's pools), whose GPU count is not a
        # power of two
        self.uneven_dp = any(n & (n - 1) for n in [cluster.num_gpus] + [
            p.mesh.size for p in self.pins.values() if p.mesh is not None])
        self.capacity = int(cluster.gpu.memory_bytes * (1 - headroom))
        self.host_capacity = int(cluster.gpu.host_memory_bytes * cluster.gpus_per_node
                                 * (1 - headroom))
        self._choice = lru_cache(maxsize=None)(self._best_choice)
        self._all_options = lru_cache(maxsize=None)(self._options)
        self._tied = lru_cache(maxsize=None)(self._tied_choice)
        self._cache: dict[tuple, Evaluation | None] = {}
        self.on_evaluate: Callable[[int], None] | None = None   # progress: evaluations so far
        self._layouts: dict[tuple, _Layout | Infeasible] = {}

    def _packed_lengths(self) -> dict[str, int]:
        """Forward and train calls over rollouts run on packed sequences (no padding to
        the longest response: ReaLHF, Mei et al. 2024 §5, and verl's remove-padding pack
        variable-length sequences), so with a length distribution they cost prompt + the
        mean response per sequence. Call name -> the sequence length to price."""
        if self.lengths is None:
            return {}
        out = {}
        for g in (c for c in self.calls if c.phase == "generate"):
            mean = self.lengths.capped(max(g.new_tokens, 1)).quantiles(512).mean()
            for c in self.calls:
                if c.phase in ("forward", "train") and c.seq == g.seq + g.new_tokens:
                    out[c.name] = int(round(g.seq + mean))
        return out

    def _tied_choice(self, name: str, lead: Strategy) -> Choice:
        """Follower `name` on its leader's engine, built with strategy `lead`."""
        c = self.by_name[name]
        return self.cost(c, shared_strategy(lead, c.phase, c.batch))

    # -- strategies -----------------------------------------------------------------------
    def cost(self, c: CallInfo, s: Strategy) -> Choice:
        spec = self.specs[c.model]
        if c.phase == "generate":   # a serving engine: KV budget, continuous refill, tail
            from graphrl.serving import serve_generate

            r = serve_generate(spec, c.batch, c.seq, c.new_tokens, s, self.cluster.gpu,
                               self.gen_engine, lengths=self.lengths, params=self.params,
                               gpus_per_node=self.cluster.gpus_per_node)
            return Choice(s, r.seconds * c.repeats, r.peak_bytes,
                          int(spec.weight_bytes / (s.tp * s.pp)))
        cc = estimate(spec, c.phase, c.batch, self._packed.get(c.name, c.seq), s,
                      self.cluster.gpu, c.new_tokens,
                      "hf", params=self.params, gpus_per_node=self.cluster.gpus_per_node)
        if c.phase == "train":
            resident = int(model_state_bytes(spec, s))
        else:
            resident = int(spec.weight_bytes / (s.tp * s.pp))
        speed = self.efficiency.get(s.engine or "hf", 1.0)   # engine tokens/s over HF's
        return Choice(s, cc.seconds * c.repeats / speed, cc.peak_memory_bytes, resident)

    def _options(self, name: str, n: int) -> tuple[tuple[Choice, ...], int]:
        """Every strategy on n GPUs that fits a GPU (and the pins), fastest first; and the
        least peak bytes of any strategy (what an infeasible call would need)."""
        c = self.by_name[name]
        pin = self.pins.get(c.call)
        pinned = dict(pin.fields) if pin is not None else {}
        fitting: list[tuple[float, Choice]] = []
        least = math.inf
        followers = self._followers.get(name, ())
        placed = pin.strategy_of(name) if pin is not None else None
        if placed is not None:   # a placed graph's: as it is
            cands = [placed] if placed.world == n else []
        else:
            raw = [s for s in candidate_strategies(self.specs[c.model], c.phase, n, c.batch,
                                                   self.cluster.gpus_per_node, self.uneven_dp)
                   if not any(getattr(s, k) != val for k, val in pinned.items())]
            # none that an engine runs: plan them anyway (graphrl.engines refuses by name)
            fixed = self.engines.get(c.model, "")
            features = frozenset(self.specs[c.model].arch.features())
            cands = [v for s in raw for v in engine_variants(c.phase, s, fixed, features)] or [
                replace(s, engine=fixed) for s in raw if "lora" not in features
                or c.phase == "generate"]   # LoRA: only what an engine runs exactly
        for s in cands:
            ch = self.cost(c, s)
            tied = [self._tied(f, s) for f in followers]   # priced with their leader
            peak = max([ch.peak_bytes] + [t.peak_bytes for t in tied])
            least = min(least, peak)
            if peak <= self.capacity:
                fitting.append((ch.seconds + sum(t.seconds for t in tied), ch))
        fitting.sort(key=lambda x: x[0])   # stable: ties keep enumeration order
        return tuple(ch for _, ch in fitting), int(least) if least < math.inf else 0

    def _best_choice(self, name: str, n: int, budget: float = math.inf) -> Choice | Infeasible:
        """The fastest strategy on n GPUs that fits a GPU and keeps at most `budget` bytes
        resident on each between calls."""
        if name in self._leader:   # runs on its model's shared engine, as its leader says
            lead = self._choice(self._leader[name], n, budget)
            if isinstance(lead, Infeasible):
                return lead
            return self._tied(name, lead.strategy)
        fitting, least = self._all_options(name, n)
        best = next((ch for ch in fitting if ch.resident_bytes <= budget), None)
        if best is None:
            return Infeasible(self.by_name[name].call, n, least, self.capacity)
        return best

    def least_seconds(self, name: str, n: int) -> float:
        """The least seconds call `name` can take on n GPUs under any strategy that fits,
        whatever its leader (a model's shared engine) or a memory budget picks in a
        schedule: what lower bounds (bound.py) may use. inf when nothing fits."""
        if name in self._leader:
            options = self._all_options(self._leader[name], n)[0]
            return min((self._tied(name, ch.strategy).seconds for ch in options),
                       default=math.inf)
        return min((ch.seconds for ch in self._all_options(name, n)[0]), default=math.inf)

    def choice(self, name: str, n: int, budget: float = math.inf) -> Choice:
        ch = self._choice(name, n, budget)
        if isinstance(ch, Infeasible):
            raise ch
        return ch

    def fits(self, name: str, n: int) -> bool:
        return not isinstance(self._choice(name, n), Infeasible)

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, assignment: Mapping[str, DeviceMesh], stream: int = 1) -> Evaluation:
        """Predicted step of one assignment (raises Infeasible if a call cannot fit)."""
        for call, pin in self.pins.items():
            unit = next((c.unit for c in self.calls if c.call == call), None)
            if pin.mesh is not None and unit is not None:
                assignment = {**assignment, unit: pin.mesh}
        key = (tuple(sorted((u, m.gpus[0], m.gpus[-1], m.size) for u, m in assignment.items())),
               stream)
        if key not in self._cache:
            if self.on_evaluate is not None:
                self.on_evaluate(len(self._cache) + 1)
            try:
                self._cache[key] = self._evaluate(dict(assignment), stream)
            except Infeasible:
                self._cache[key] = None
                raise
        ev = self._cache[key]
        if ev is None:
            raise Infeasible("a call", 0, 0, self.capacity)
        return ev

    @property
    def evaluations(self) -> int:
        """Distinct (placement, streaming) pairs evaluated so far."""
        return len(self._cache)

    def try_evaluate(self, assignment: Mapping[str, DeviceMesh],
                     stream: int = 1) -> Evaluation | None:
        try:
            return self.evaluate(assignment, stream)
        except Infeasible:
            return None

    def _evaluate(self, assign: dict[str, DeviceMesh], stream: int) -> Evaluation:
        """The faster of: each call's fastest strategy (offloading where colocated models
        overflow a GPU), and leaner strategies (more tensor/pipeline sharding, ZeRO) that
        keep what stays resident within a share of the GPU, so that colocated models fit
        together and nothing is offloaded (ReaLHF, Mei et al. 2024, §3: each call gets its
        own parallel layout; verl shards colocated models for the same reason)."""
        fast = self._layout(assign, {})
        ev = self._schedule(assign, stream, fast)
        over = fast if fast.host[1] > self.host_capacity else None
        if over is not None:
            ev = None
        if not fast.offloaded:
            if ev is None:
                self._refuse_host(over.host[0], over.host[1], self.host_capacity)
                raise HostMemoryInfeasible(over.host[0], over.host[1], self.host_capacity)
            return ev
        for share in LEAN_SHARES:
            try:
                if share not in fast.lean:   # the same for every streaming factor
                    fast.lean[share] = self._lean_budgets(assign, fast, share)
                lean = self._layout(assign, fast.lean[share])
            except Infeasible:
                continue
            if lean.host[1] > self.host_capacity:
                continue
            lean_ev = self._schedule(assign, stream, lean)
            if ev is None or lean_ev.step_seconds < ev.step_seconds:
                ev = lean_ev
            if not lean.offloaded:
                break   # a smaller share only makes calls slower, with no swap left to save
        if ev is None:
            self._refuse_host(over.host[0], over.host[1], self.host_capacity)
            raise HostMemoryInfeasible(over.host[0], over.host[1], self.host_capacity)
        return ev

    def _lean_budgets(self, assign: dict[str, DeviceMesh], fast: "_Layout",
                      share: float) -> dict[str, float]:
        """Resident bytes per GPU allowed to each unit on overflowing GPUs: `share` of the
        room its GPU group leaves after the largest transient, split evenly among the
        units that keep state there (whole GiB, so that choices stay cached)."""
        resident = fast.resident
        transient: dict[str, int] = {}   # unit -> its largest call's working memory
        for name, ch in fast.choices.items():
            u = self.by_name[name].unit
            transient[u] = max(transient.get(u, 0), ch.peak_bytes - resident[u])
        keeping = [u for u in assign if resident[u] > 0]
        mask = np.zeros(self.cluster.num_gpus, dtype=np.int64)
        for i, u in enumerate(keeping):
            mask[_index(assign[u])] |= 1 << i
        budgets: dict[str, float] = {}
        for m in np.unique(mask[list(fast.offloaded)]):
            present = [u for i, u in enumerate(keeping) if int(m) >> i & 1]
            if len(present) < 2:
                continue
            room = (self.capacity - max(transient[u] for u in present)) * share / len(present)
            for u in present:
                budgets[u] = min(budgets.get(u, math.inf), float(int(room) >> 30 << 30))
        return budgets

    def _layout(self, assign: dict[str, DeviceMesh], budgets: Mapping[str, float]) -> "_Layout":
        """What does not depend on streaming: strategies, resident state, offloaded GPUs
        and the reshard (cached: the search tries every streaming factor of a placement)."""
        key = (tuple(sorted((u, m.gpus) for u, m in assign.items())),
               tuple(sorted(budgets.items())))
        if key not in self._layouts:
            try:
                choices = {c.name: self.choice(c.name, assign[c.unit].size,
                                               budgets.get(c.unit, math.inf))
                           for c in self.calls if c.phase != "op"}
            except Infeasible as e:
                self._layouts[key] = e
                raise
            resident = self._resident(assign, choices)
            offloaded = frozenset(self._offloaded_gpus(assign, resident, choices))
            self._layouts[key] = _Layout(choices, resident, offloaded,
                                         *self._reshard(assign, choices),
                                         assignment=tuple(sorted(assign.items())),
                                         host=self._host_bytes(assign, resident, choices,
                                                               offloaded))
        out = self._layouts[key]
        if isinstance(out, Infeasible):
            raise out
        return out

    def _schedule(self, assign: dict[str, DeviceMesh], stream: int,
                  layout: "_Layout") -> Evaluation:
        choices, resident, offloaded = layout.choices, layout.resident, layout.offloaded
        reshard_s, reshard_bytes, reshard_gpus = (layout.reshard_s, layout.reshard_bytes,
                                                  layout.reshard_gpus)
        free = np.zeros(self.cluster.num_gpus)  # when each GPU is next free
        free[list(reshard_gpus)] = reshard_s
        done: dict[str, Scheduled] = {}
        gen_names = self._gen_names
        for c in self.calls:
            ready = max((done[d].end for d in c.deps), default=0.0)
            if c.phase == "op":
                done[c.name] = Scheduled(c.name, None, None, ready, ready + OP_SECONDS)
                continue
            mesh, ch = assign[c.unit], choices[c.name]
            swap = 0.0
            if offloaded and not offloaded.isdisjoint(mesh.gpu_set):
                swap = 2 * resident[c.unit] / self.cluster.gpu.host_bw
            dur = ch.seconds + swap
            streamed = [done[d] for d in c.deps if stream > 1 and c.phase == "forward"
                        and d in gen_names and not done[d].mesh.overlaps(mesh)]
            if streamed:
                gen = streamed[0]
                first = gen.start + (gen.end - gen.start) / stream
                others = max((done[d].end for d in c.deps if d != gen.name), default=0.0)
                ready = max(first, others)
            idx = _index(mesh)
            start = max(ready, float(free[idx].max()))
            end = start + dur
            if streamed:
                end = max(end, streamed[0].end + dur / stream)
            free[idx] = end
            done[c.name] = Scheduled(c.name, mesh, ch, start, end, swap)
        step = max(s.end for s in done.values())
        return Evaluation(layout.assignment, step,
                          tuple(done[c.name] for c in self.calls), reshard_s, reshard_bytes,
                          stream, layout.offloaded_sorted, layout.resident_sorted)

    def _resident(self, assign: dict[str, DeviceMesh],
                  choices: dict[str, Choice]) -> dict[str, int]:
        """Bytes each unit keeps on each of its GPUs between calls."""
        out: dict[str, int] = {}
        for unit in self.units:
            calls = [c for c in self.calls if c.unit == unit and c.phase != "op"]
            if all(c.phase == "generate" for c in calls):
                owner = calls[0].model
                if owner in assign and assign[owner] == assign[unit]:
                    out[unit] = 0  # hybrid engine: generation reuses the training weights
                    continue
            out[unit] = max(choices[c.name].resident_bytes for c in calls)
        return out

    def _offloaded_gpus(self, assign: dict[str, DeviceMesh], resident: dict[str, int],
                        choices: dict[str, Choice]) -> set[int]:
        """GPUs whose units' states plus the largest call's working memory overflow."""
        units = list(assign)
        mask = np.zeros(self.cluster.num_gpus, dtype=np.int64)
        for i, u in enumerate(units):
            mask[_index(assign[u])] |= 1 << i
        transient: dict[str, int] = {}   # unit -> its largest call's working memory
        for c in self.calls:
            if c.phase != "op":
                transient[c.unit] = max(transient.get(c.unit, 0),
                                        choices[c.name].peak_bytes - resident[c.unit])
        over = set()
        for m in np.unique(mask):
            present = [u for i, u in enumerate(units) if int(m) >> i & 1]
            if len(present) < 2:
                continue
            states = sum(resident[u] for u in present)
            if states + max(transient[u] for u in present) > self.capacity:
                over.update(np.flatnonzero(mask == m).tolist())
        return over

    def _refuse_host(self, node: int, need: int, have: int) -> None:
        """Remember the host-RAM refusal needing least (what the error reports)."""
        if self.host_failure is None or need < self.host_failure.need:
            self.host_failure = HostMemoryInfeasible(node, need, have)

    def _host_bytes(self, assign: dict[str, DeviceMesh], resident: dict[str, int],
                    choices: dict[str, Choice], offloaded: frozenset[int]) -> tuple[int, int]:
        """(node, bytes) of the node whose host RAM holds the most: the states swapped out
        from its offloading GPUs plus its ranks' optimizer-offloaded Adam states."""
        opt: dict[str, float] = {}
        for c in self.calls:
            if c.phase == "train" and choices[c.name].strategy.offload:
                opt[c.unit] = host_state_bytes(self.specs[c.model], choices[c.name].strategy)
        if not opt and not offloaded:
            return (0, 0)
        per_gpu = np.zeros(self.cluster.num_gpus)
        swapped = np.zeros(self.cluster.num_gpus, dtype=bool)
        swapped[list(offloaded)] = True
        for u, mesh in assign.items():
            idx = _index(mesh)
            per_gpu[idx] += opt.get(u, 0.0) + resident.get(u, 0) * swapped[idx]
        per_node = per_gpu.reshape(self.cluster.nodes, self.cluster.gpus_per_node).sum(axis=1)
        node = int(per_node.argmax())
        return node, int(per_node[node])

    def _reshard(self, assign: dict[str, DeviceMesh],
                 choices: dict[str, Choice]) -> tuple[float, int, tuple[int, ...]]:
        """Moving each trained policy's weights into its generation layout (§ module doc)."""
        seconds, nbytes, gpus = 0.0, 0, set()
        for gen in (c for c in self.calls if c.phase == "generate"):
            train = next((c for c in self.calls if c.model == gen.model and c.phase == "train"),
                         None)
            if train is None:
                continue
            st, sg = choices[train.name].strategy, choices[gen.name].strategy
            mt, mg = assign[train.unit], assign[gen.unit]
            received = reshard_received_bytes(self.specs[gen.model].sync_bytes, st, sg,
                                              colocated=mt == mg)
            bw = self._link(mg.gpus if mt == mg else mt.gpus + mg.gpus)
            if received > 0:
                seconds = max(seconds, received / bw)
                nbytes += int(received * mg.size)
                gpus |= set(mt.gpus) | set(mg.gpus)
        return seconds, nbytes, tuple(sorted(gpus))

    def _link(self, gpus: tuple[int, ...]) -> float:
        """NVLink if these GPUs share a node (ids are node-major), else the NIC."""
        c = self.cluster
        if c.node_of(min(gpus)) == c.node_of(max(gpus)):
            return c.gpu.intra_node_bw
        return c.gpu.inter_node_bw

    # -- what the user needs to hear when nothing fits ------------------------------------
    def min_gpus(self, name: str, limit: int = 4096) -> int | None:
        """Smallest mesh size on which the call fits at all."""
        n = 1
        while n <= limit:
            if self.fits(name, n):
                return n
            n *= 2
        return None


def replace_cluster(problem: Problem, cluster: ClusterSpec) -> Problem:
    return Problem(problem.calls, problem.specs, cluster, problem.gen_engine, problem.params,
                   problem.pins, problem.lengths, problem.headroom, problem.engines,
                   problem.efficiency)


__all__ = ["CallInfo", "Pin", "Choice", "Scheduled", "Evaluation", "Infeasible", "Problem",
           "HostMemoryInfeasible", "DEFAULT_HEADROOM",
           "candidate_strategies", "replace_cluster"]
