"""`RayExecutor`: run a compiled Plan on Ray, one actor per GPU rank.

Set-up (once): one placement group per node of the plan's cluster, a {GPU: 1} bundle per
GPU, STRICT_PACK, so the ranks of a node-aligned mesh share a Ray node; one
`runtime.ExecWorker` actor per GPU in its bundle (world rank == global GPU id); a gloo
world group and one sub-group per mesh that trains data-parallel; the engines
`assign.assign_engines` chooses (colocated calls share their rank's process); for every
reshard node a TransferPlan (`plan_model_reshard`) from the training engine's real layout
to the generation engine's, on the real parameter names and shapes.

A step walks the plan's instruction groups in `assign.dispatch_order`:
- `run` on GPUs: every rank of the node's mesh gets its call with its slice of the batch
  (`assign.split_rows`; training: every rank sees the whole batch and takes its part of
  each minibatch). The call is issued without waiting; its result stays a Ray object
  that later calls take as arguments, so calls on disjoint meshes run at the same time.
  A streamed run (parts k/K) runs whole at its first part. A streamed async step's
  parts (passes/lower_stream.py): generate's `head` and a `head_part` call's `rest` run
  where they are; its `tail`, the push before it and the `early` parts are issued after
  the step's other instructions (stream_calls.py, head_parts.py).
- `run` on the host: an op, on the driver, once its inputs have arrived.
- `reshard`: every GPU of the TransferPlan runs its part (torch.distributed
  point-to-point); the bytes each sent are recorded beside the plan's figure. A LoRA
  model's reshard (sync="adapters") moves its adapters only (reshard_steps.py).
- `offload` / `onload`: on each rank; `send` / `recv`: nothing to do (data moves as Ray
  objects); `free`: the driver drops the value once every worker has freed it.
Every wait has a deadline and watches every call in flight, so a rank that dies or
raises ends the step at once with an ExecutionError naming the node, the call and the
rank. A failed executor is closed by its owner (`close()`), which kills the actors,
removes the placement groups and, if it started Ray, shuts Ray down.

Sampling matches the local backend: each generate call uses the node's seed
(`seed_for(seed, iteration, node)`) and every data-parallel rank draws the noise of the
whole batch, using its own rows (`HFEngine.generate(noise_rows=...)`).
Timelines: workers stamp calls with time.time(); the driver maps each rank's clock to its
own with an offset measured at start (half a round trip of uncertainty).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Sequence

import ray

from graphrl.backends.engines.hf import seed_for
from graphrl.backends.local import StepResult, WeightsToken, check_payload
from graphrl.errors import ExecutionError, GraphRLError, OpError, UsageError
from graphrl.evaluation import EVAL_EVERY, due, run_attrs
from graphrl.finite import check_op_outputs
from graphrl.graph import CALL, Node
from graphrl.plan import HOST, Plan
from graphrl.sampling import variable_values
from graphrl.timeline import Event
from graphrl.trace import Program

from .assign import Group, assign_engines, dispatch_order, split_rows
from .group import GRACE_S, RankGroup, WorkerError, gather
from .report import ReshardRecord, predicted_call_seconds, summary_lines
from .specs import CallSpec, InputSpec, Stamp, with_loss
from .stream_calls import (LATER_PARTS, check_streams, push_before_head, skip_push,
                           stream_head, stream_tails)
from .head_parts import HEAD_PART, issue_head_parts, run_rest, split_host_op
from .reshard_steps import ReshardSteps
from .state import CheckpointMethods
from .values import _Value

class RayExecutor(CheckpointMethods, ReshardSteps):
    """Runs `program`'s step as `plan` (compiled from program.graph) on Ray ranks.

    Ray must be initialised (`cluster.start_ray`) with the plan's GPUs. `store_host`:
    where rank 0 opens the process-group store (None: rank 0's node address);
    `env`: environment of the rank processes (e.g. GLOO_SOCKET_IFNAME=lo on one
    machine). `noop`: engines that only return zeros of the declared shapes (dispatch
    overhead). `check_reshards`: after each reshard, compare the generation weights with
    the training weights (all-gathers; for tests). `session`: a RaySession this executor
    owns and shuts down on close(). `timeout_s`: the longest any one wait may take (the
    driver for results, a rank in a collective or a reshard transfer)."""

    def __init__(self, program: Program, plan: Plan, *, seed: int = 0, device: str = "cpu",
                 timeout_s: float = 120.0, noop: bool = False, check_reshards: bool = False,
                 store_host: Optional[str] = "127.0.0.1",
                 env: Optional[Mapping[str, str]] = None, session: Any = None):
        self._t0 = time.time()
        self.program, self.plan, self.graph = program, plan, plan.graph
        self.seed, self.device, self.timeout_s = seed, device, timeout_s
        self.noop, self.check_reshards, self.session = noop, check_reshards, session
        self.group: Optional[RankGroup] = None
        self.placement_groups: list[Any] = []
        self.reshards: list[ReshardRecord] = []
        self.instructions_dispatched = 0
        self.actor_calls = 0
        self._broken: Optional[str] = None
        self._pending: dict[Any, tuple[str, str, int]] = {}   # stamp ref -> node, call, rank
        self._stamps: list[Stamp] = []
        self._ran: dict[str, tuple[int, set[str]]] = {}   # node -> iteration, what ran
        self._carried: Optional[dict[str, Optional[WeightsToken]]] = None
        self._carried_data: dict[str, Any] = {}   # async: queued payloads (driver-side)
        try:
            if not ray.is_initialized():
                raise UsageError("Ray is not initialised: start it first "
                                 "(graphrl.backends.ray.cluster.start_ray)")
            self.engines = assign_engines(self.graph, program.models, seed, noop)
            self.order = dispatch_order(plan)
            self._frees = self._count_frees()
            self._variable = variable_values(self.graph)
            self._check_batches()
            check_streams(self)
            self._start(store_host, dict(env or {}))
        except BaseException:
            self.close()
            raise

    # -- set-up -------------------------------------------------------------------------------
    def _count_frees(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, i in self.plan.instrs():
            if i.op == "free":
                counts[i.value] = counts.get(i.value, 0) + 1
        return counts

    def _check_batches(self) -> None:
        """Data-parallel training needs equal slices of every minibatch (the gradients of
        the ranks' mean losses average to the whole minibatch's only then)."""
        for n in self.graph.nodes:
            if n.kind != CALL or n.target != "train":
                continue
            ranks = n.placement.strategy.dp   # the rest of the mesh is tp x pp (megatron)
            batch = self.graph.value(n.inputs[1]).spec.batch
            what = "batch"
            if n.inputs[1] in self._variable:   # any number of kept groups must split
                batch, what = self._variable[n.inputs[1]], "kept group of"
            mb = int(n.attr("minibatches", 1))
            if ranks > 1 and (batch % mb or (batch // mb) % ranks):
                raise UsageError(f"node {n.name} ({n.call}): {what} {batch} in {mb} "
                                 f"minibatches does not split evenly over its {ranks} "
                                 f"data-parallel ranks {n.placement.mesh.text()}")

    def _start(self, store_host: Optional[str], env: dict[str, str]) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .cluster import mesh_placement_group
        from .runtime import ExecWorker

        cluster = self.plan.cluster
        gpn, world = cluster.gpus_per_node, cluster.num_gpus
        tag = f"graphrl-{id(self):x}"
        for node in range(cluster.nodes):
            try:
                self.placement_groups.append(mesh_placement_group(
                    gpn, "STRICT_PACK", timeout_s=min(self.timeout_s, 60.0),
                    name=f"{tag}-node{node}"))
            except TimeoutError as e:
                raise ExecutionError(f"the plan needs {cluster.text()}: {cluster.nodes} "
                                     f"node(s) with {gpn} GPUs each; Ray could not place "
                                     f"node {node}'s: {e}") from None
        actor_cls = ray.remote(ExecWorker)
        actors = {}
        for rank in range(world):
            strategy = PlacementGroupSchedulingStrategy(
                self.placement_groups[rank // gpn], placement_group_bundle_index=rank % gpn)
            actors[rank] = actor_cls.options(
                num_gpus=1, num_cpus=0.1, max_restarts=0, max_task_retries=0,
                scheduling_strategy=strategy).remote(rank, world, device=self.device,
                                                     num_threads=1, env=env)
        self.group = RankGroup(actors, timeout_s=self.timeout_s)
        self.group.call("ping")
        self.rank_nodes = self.group.call("node_id")
        host = store_host or self.group.call("node_ip", on=[0])[0]
        self.group.init_process_group(host, timeout_s=self.timeout_s)
        for name in sorted(self.engines.groups):
            self.group.new_group(name, self.engines.groups[name], timeout_s=self.timeout_s)
        # a shared base (LoRA) is built after the engine it runs on, on each of its ranks
        specs = sorted(self.engines.specs.items(), key=lambda kv: (bool(kv[1].base), kv[0]))
        refs = {(key, rank): self.group.actors[rank].build.remote(spec)
                for key, spec in specs for rank in spec.gpus}
        self.layouts = {key: layout for (key, _), layout in
                        self._gather_keyed(refs, "build").items()}
        self.versions = {key: 0 for key in self.engines.specs}
        self._transfer_plans = self._plan_reshards()
        self.clock_offsets = self._clock_offsets()

    def _gather_keyed(self, refs: Mapping[tuple[str, int], Any], what: str) -> dict:
        """Results of (engine key, rank) -> ref calls, in completion order; the first
        failure raises a WorkerError naming the engine and the rank."""
        key_of = {ref: k for k, ref in refs.items()}
        out = {}
        pending = list(refs.values())
        deadline = time.monotonic() + self.timeout_s + GRACE_S
        while pending:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                late = sorted(key_of[r] for r in pending)
                raise WorkerError(f"{what}: (engine, rank) {late} did not finish within "
                                  f"{self.timeout_s:g} s", late[0][1], what)
            key, rank = key_of[ready[0]]
            out[(key, rank)] = gather({rank: ready[0]}, f"{what} {key}", self.timeout_s)[rank]
        return out

    def _clock_offsets(self) -> dict[int, float]:
        """rank -> (rank clock - driver clock), from one round trip each."""
        offsets = {}
        for rank, actor in self.group.actors.items():
            t0 = time.time()
            remote = ray.get(actor.clock.remote(), timeout=self.timeout_s)
            t1 = time.time()
            offsets[rank] = remote - (t0 + t1) / 2
        return offsets

    # -- Experiment.prepare -------------------------------------------------------------------
    def prepare(self, fn: Callable[[Mapping[str, Any]], Mapping[str, float]]
                ) -> dict[str, float]:
        """Run `fn` on driver-side engines, then load the weights it changed into every
        engine of those models on the ranks (optimizer state stays behind)."""
        from .driver_engines import DriverEngines

        engines = DriverEngines(self.program, self.seed)
        result = dict(fn(engines))
        for name, eng in engines.built.items():
            keys = [k for k, s in self.engines.specs.items()
                    if s.decl.name == name and not s.base]   # a shared base holds nothing
            if not keys or self.noop:
                continue
            weights = ray.put(eng.export_weights())
            refs = {(k, r): self.group.actors[r].load_weights.remote(k, weights)
                    for k in keys for r in self.engines.specs[k].gpus}
            self._gather_keyed(refs, "load_weights")
            for k in keys:
                self.versions[k] = eng.version
        return result

    # -- a step -------------------------------------------------------------------------------
    streams_ahead = True   # run_step takes the next step's inputs (stream_calls.py)

    def run_step(self, inputs: Mapping[str, Any], iteration: int = 0,
                 upcoming: Optional[Mapping[str, Any]] = None) -> StepResult:
        if self._broken:
            raise ExecutionError(f"the Ray executor failed earlier ({self._broken}); "
                                 "start a new one")
        try:
            return self._step(inputs, iteration, upcoming)
        except GraphRLError as e:
            self._broken = str(e).splitlines()[0]
            raise
        except BaseException as e:
            self._broken = type(e).__name__
            raise

    def _step(self, inputs: Mapping[str, Any], iteration: int,
              upcoming: Optional[Mapping[str, Any]] = None) -> StepResult:
        g = self.graph
        start = time.time()
        self._stamps = []
        env: dict[str, _Value] = {}
        queued = dict(g.carries)
        for v in g.inputs:
            if not v.spec.is_weights and v.name in queued:   # async queue stage
                if v.name in self._carried_data:
                    env[v.name] = _Value(local=self._carried_data[v.name])
                continue
            if v.spec.is_weights:   # at first, whatever version set-up left
                first = WeightsToken(v.spec.model, self.versions.get(v.spec.model, 0))
                token = (self._carried or {}).get(v.name, first)
                env[v.name] = _Value(token=token)
                continue
            name = v.name.lstrip("%")
            if name not in inputs:
                raise ExecutionError(f"step @{g.name}: input {name!r} was not given "
                                     f"(given: {', '.join(inputs) or 'none'})")
            env[v.name] = _Value(local=inputs[name])
        # an async step's first steps only generate (passes/staleness): skip what needs
        # a queue stage not yet filled
        warmup = any(v.name in queued and not v.spec.is_weights and v.name not in env
                     for v in g.inputs)
        host_events: list[Event] = []
        frees = dict(self._frees)
        checks: list[tuple[str, Any, Any]] = []
        reshards: list[tuple[Node, dict[int, Any]]] = []
        for grp in self.order:
            self.instructions_dispatched += len(grp.members)
            part = grp.members[0][1].part
            if part in LATER_PARTS:   # issued after the step's instructions (stream_tails,
                continue              # issue_head_parts)
            if grp.op == "run":
                n = g.node(grp.node)
                if n.attr("stream_cut") and n.inputs[0] not in env:   # its push comes later
                    reshards += push_before_head(self, n, env, iteration, _Value, checks)
                if warmup and not all(i in env for i in n.inputs):
                    continue
                if not due(n, iteration):   # an eval node between evaluations
                    continue
                if grp.workers == (HOST,):
                    host_events.append(self._run_op(n, env, iteration))
                elif part in ("", "head", "rest") or part.startswith("1/"):
                    # streamed: whole at its first part
                    if n.attr("stream_cut"):   # streamed generation: head now, tail last
                        stream_head(self, n, env, iteration)
                    elif n.attr(HEAD_PART):   # started on the head part (head_parts.py)
                        run_rest(self, n, env, iteration, _Value)
                    else:
                        self._run_call(n, env, iteration)
            elif grp.op == "reshard":
                n = g.node(grp.node)
                if skip_push(self, n, env, _Value) or not due(n, iteration):
                    continue   # a streamed tail pushed it / an eval reshard between evals
                reshards.append((n, self._run_reshard(n, env, iteration)))
                if self.check_reshards and not self.noop:
                    checks.append(self._check_reshard(n))
            elif grp.op in ("offload", "onload"):
                self._memory_op(grp, iteration)
            elif grp.op == "free":
                value = grp.members[0][1].value
                frees[value] -= 1
                if not frees[value]:
                    env.pop(value, None)
        reshards += stream_tails(self, env, iteration, upcoming, _Value)
        issue_head_parts(self, iteration, _Value)
        outputs = {o.lstrip("%"): self._resolve(env[o], o) for o in g.outputs if o in env}
        self._await(list(self._pending), "the step's last calls")
        self._record_reshards(reshards, checks, iteration)
        carried = dict(self._carried or {})   # what a warm-up step did not make carries over
        for dst, src in g.carries:
            if src not in env:
                continue
            if env[src].token is not None:
                carried[dst] = env[src].token
            else:   # a queued rollout: kept on the driver until a later step reads it
                self._carried_data[dst] = self._resolve(env[src], src)
        self._carried = carried
        events = [self._event(s) for s in self._stamps] + host_events
        events.sort(key=lambda e: (e.start, e.worker))
        return StepResult(outputs, tuple(events), time.time() - start, warmup)

    def _event(self, s: Stamp) -> Event:
        off = self.clock_offsets.get(s.rank, 0.0) + self._t0
        return Event(s.node, s.call, s.model, f"gpu{s.rank}", s.start - off, s.end - off,
                     s.iteration, s.nbytes, s.ran)

    # -- instructions -------------------------------------------------------------------------
    def _submit(self, rank: int, method: str, node: Node, *args: Any, **kw: Any
                ) -> tuple[Any, Any]:
        """Issue `method` on `rank` (returns result ref, stamp ref); tracked until done."""
        actor = self.group.actors[rank]
        result, stamp = getattr(actor, method).options(num_returns=2).remote(*args, **kw)
        self._pending[stamp] = (node.name, node.call, rank)
        self.actor_calls += 1
        return result, stamp

    def _weights(self, n: Node, env: Mapping[str, _Value], key: str) -> WeightsToken:
        token = env[n.inputs[0]].token
        if token is None or token.version != self.versions[key]:
            raise ExecutionError(f"node {n.name} ({n.call}) reads {n.model} weights version "
                                 f"{getattr(token, 'version', None)} but engine {key} holds "
                                 f"{self.versions[key]}")
        return token

    def _run_call(self, n: Node, env: dict[str, _Value], iteration: int) -> None:
        key = self.engines.node_engine[n.name]
        spec = self.engines.specs[key]
        token = self._weights(n, env, key)
        ranks = n.placement.mesh.gpus
        data = [env[i] for i in n.inputs[1:]]
        for v in data:
            self._to_refs(v)
        out_spec = n.outputs[0].spec if n.target != "train" else n.outputs[1].spec
        seed = seed_for(self.seed, iteration, n.name)
        attrs = tuple((k, v) for k, v in n.attrs if k not in ("behaviour", "staleness",
                                                              HEAD_PART, EVAL_EVERY))
        if n.attr("staleness") is not None:   # async train: samples within the bound
            from graphrl.backends.async_steps import check_versions

            versions = self._resolve(env[n.inputs[-1]], n.inputs[-1])
            check_versions(n, {"versions": versions}, token.version, int(n.attr("staleness")))
        if n.target == "train":
            attrs = with_loss(attrs, self.program)
        common = dict(node=n.name, call=n.call, model=n.model, method=n.target, engine=key,
                      attrs=attrs, seed=seed, iteration=iteration, output=out_spec)
        results, stamps, bounds, used = [], [], [], []
        if n.target == "train":
            for i, rank in enumerate(ranks):
                args = [r for v in data for r in v.parts]
                cs = CallSpec(inputs=tuple(InputSpec(len(v.parts)) for v in data),
                              shard=(i, len(ranks)) if len(ranks) > 1 else None, **common)
                r, s = self._submit(rank, "run", n, cs, *args)
                results.append(r)
                stamps.append(s)
            self.versions[key] += 1
            env[n.outputs[0].name] = _Value(token=WeightsToken(n.model, token.version + 1))
            env[n.outputs[1].name] = _Value(parts=results, stamps=stamps, mean=True)
            return
        batch = self.graph.value(n.inputs[1]).spec.batch
        if n.inputs[1] in self._variable:   # after dynamic sampling: the rows it holds
            batch = data[0].bounds[-1][1]
        samples = int(n.attr("samples", 1)) if n.target == "generate" else 1
        # megatron / DeepSpeed: a collective; every rank takes the whole batch, splits it
        # by its own coordinates and returns the whole result (the first rank's is used)
        whole = spec.kind in ("megatron", "deepspeed")
        collective = spec.kind == "fsdp"
        if collective and batch < len(ranks):
            raise ExecutionError(f"node {n.name} ({n.call}): batch {batch} is smaller than "
                                 f"its FSDP mesh of {len(ranks)} ranks")
        for i, rank in enumerate(ranks):
            lo, hi = (0, batch) if whole else split_rows(batch, len(ranks), i)
            if hi == lo and not collective:
                continue
            v = data[0]
            picked = [k for k, (a, b) in enumerate(v.bounds) if a < hi and b > lo] or [0]
            cs = CallSpec(inputs=(InputSpec(len(picked), v.bounds[picked[0]][0]),),
                          rows=(lo, hi), total=batch, **common)
            r, s = self._submit(rank, "run", n, cs, *[v.parts[k] for k in picked])
            results.append(r)
            stamps.append(s)
            bounds.append((lo * samples, hi * samples))
            used.append(rank)
        if whole:
            results, bounds, used = results[:1], bounds[:1], used[:1]
        env[n.outputs[0].name] = _Value(parts=results, bounds=bounds, stamps=stamps)
        if n.attr("behaviour"):   # async generate (passes/staleness): two more outputs
            from .async_calls import behaviour_values

            outs = behaviour_values(self._submit, n, self.graph, token, results, bounds,
                                    used, common)
            env[n.outputs[1].name] = _Value(parts=outs[0], bounds=list(bounds),
                                            stamps=outs[1])
            env[n.outputs[2].name] = _Value(local=outs[2])

    def _to_refs(self, v: _Value) -> None:
        """A driver-side payload becomes one Ray object (put once, read by every rank)."""
        if v.mean:   # per-rank statistics: average them first
            self._resolve(v, "statistics")
            v.parts, v.mean = None, False
        if v.parts is None:
            v.parts = [ray.put(v.local)]
            v.bounds = [(0, next(iter(v.local.values())).shape[0])]

    def _run_op(self, n: Node, env: dict[str, _Value], iteration: int) -> Event:
        args = [self._resolve(env[i], i) for i in n.inputs]
        start = time.time()
        try:
            out = (split_host_op(self, n, args) if n.attr(HEAD_PART) else
                   self.program.ops[n.target].fn(*args, **run_attrs(n)))
        except OpError as e:   # an op's user code: add the iteration
            raise e.at(iteration) from e
        except GraphRLError:
            raise
        except Exception as e:
            raise ExecutionError(f"node {n.name} ({n.call}) failed at iteration "
                                 f"{iteration}: {type(e).__name__}: {e}") from e
        end = time.time()
        results = list(out) if isinstance(out, tuple) else [out]
        for v, r in zip(n.outputs, results):
            check_payload(n, v.spec, r, v.name in self._variable)
            env[v.name] = _Value(local=r)
        check_op_outputs(n, results, iteration)
        return Event(n.name, n.call, n.model, "host", start - self._t0, end - self._t0,
                     iteration)

    def _memory_op(self, grp: Group, iteration: int) -> None:
        n = self.graph.node(grp.node)
        key = self.engines.node_engine.get(n.name, n.model)
        for w, i in grp.members:
            self._submit(w, "memory_op", n, i.op, key, n.name, iteration)

    # -- waiting ------------------------------------------------------------------------------
    def _resolve(self, v: _Value, name: str) -> Any:
        """The payload of a value on the driver (waits for the calls making it)."""
        if v.token is not None:
            return v.token
        if v.local is None:
            import torch

            self._await(v.stamps, f"value {name}")
            parts = ray.get(v.parts, timeout=self.timeout_s)
            if v.mean:
                v.local = {f: torch.stack([p[f] for p in parts]).mean(0) for f in parts[0]}
            else:
                v.local = ({f: torch.cat([p[f] for p in parts]) for f in parts[0]}
                           if len(parts) > 1 else parts[0])
        return v.local

    def _await(self, needed: Sequence[Any], what: str) -> None:
        """Wait until the calls of `needed` stamp refs finish, watching every call in
        flight: the first failure anywhere ends the wait with an ExecutionError."""
        left = {r for r in needed if r in self._pending}
        deadline = time.monotonic() + self.timeout_s + GRACE_S
        while left:
            pending = list(self._pending)
            ready, _ = ray.wait(pending, num_returns=1,
                                timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                late = sorted({f"{self._pending[r][0]} ({self._pending[r][1]}) on rank "
                               f"{self._pending[r][2]}" for r in left})
                first = self._pending[next(iter(left))]
                raise WorkerError(f"waiting for {what}: {', '.join(late)} did not finish "
                                  f"within {self.timeout_s:g} s", first[2], first[1])
            more, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            done = set(ready) | set(more)
            for ref in [r for r in pending if r in done]:   # in the order they were issued
                self._harvest(ref)
                left.discard(ref)

    def _harvest(self, ref: Any) -> None:
        node, call, rank = self._pending.pop(ref)
        running = sorted({r for _, _, r in self._pending.values()} - {rank})
        try:
            stamp = ray.get(ref, timeout=self.timeout_s)
            self._stamps.append(stamp)
            if stamp.ran:   # what its ranks ran, at its latest iteration
                it, ran = self._ran.get(stamp.node, (stamp.iteration, set()))
                if it != stamp.iteration:
                    ran = set()
                self._ran[stamp.node] = (stamp.iteration, ran | {stamp.ran})
        except ray.exceptions.RayActorError as e:
            err = WorkerError(f"node {node} ({call}) failed on rank {rank}: the worker died "
                              f"(other ranks with calls in flight: {running}): "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                              rank, call)
            err.lost = [rank]   # the runner may restart from a checkpoint (--max-restarts)
            raise err from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            raise WorkerError(f"node {node} ({call}) failed on rank {rank}: "
                              f"{type(cause).__name__}: {cause}", rank, call) from cause
        except ray.exceptions.GetTimeoutError:
            raise WorkerError(f"node {node} ({call}) on rank {rank} did not answer within "
                              f"{self.timeout_s:g} s", rank, call) from None

    # -- inspection and shutdown --------------------------------------------------------------
    def weights(self, key: str) -> dict[int, dict[str, Any]]:
        """rank -> full weights of engine `key` on each of its ranks (FSDP: all-gathers)."""
        spec = self.engines.specs[key]
        return self.group.call("export_weights", key, on=list(spec.gpus))

    def export_weights(self, model: str) -> dict[str, Any]:
        """The full weights of `model`'s training engine (one rank's copy)."""
        per_rank = self.weights(model)
        return per_rank[min(per_rank)]

    def driver_engine(self, model: str) -> Any:
        """An engine of `model` built on the driver (CPU) holding the trained weights (one
        rank's copy): what --save and --save-merged of a LoRA run write from (a peft
        module, as the local backend's engine is)."""
        from .driver_engines import DriverEngines

        return DriverEngines(self.program, self.seed).holding(model, self.export_weights)

    def predicted_call_seconds(self) -> dict[str, float]:
        """Call -> predicted seconds per step (graphrl.simulate's timeline)."""
        return predicted_call_seconds(self.plan)

    def call_engines(self) -> dict[str, dict[str, Any]]:
        """Call -> its mesh, planned strategy and engine, the engine and degrees that ran
        it (at its last run) and `differs`: the degrees that differ from the plan."""
        from .report import call_engines

        return call_engines(self.graph, self.engines.resolved, self._ran)

    def summary_lines(self, events: Sequence[Event], steps: int) -> list[str]:
        """Predicted vs measured seconds per call, reshard bytes, engines and degrees."""
        from .report import engine_lines

        return (summary_lines(self.plan, self.reshards, events, steps)
                + engine_lines(self.call_engines()))

    def close(self) -> None:
        """Kill the actors, remove the placement groups, shut down an owned session."""
        if self.group is not None:
            try:
                self.group.shutdown()
            except Exception:   # noqa: BLE001  best effort: Ray may be going down
                pass
            self.group = None
        if self.placement_groups:
            from .cluster import remove_mesh_placement_group

            for pg in self.placement_groups:
                try:
                    remove_mesh_placement_group(pg)
                except Exception:   # noqa: BLE001
                    pass
            self.placement_groups = []
        if self.session is not None:
            self.session.shutdown()
            self.session = None

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["RayExecutor", "ReshardRecord"]
