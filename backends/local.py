"""The local backend: the reference interpreter of a Program, in one process.

It runs the nodes of the graph in order on one device (CPU, or one GPU), frees each
value after its last use (as torch.fx's Interpreter does), feeds carried values (new
weights) into the next step, and records a measured timeline. It is the oracle the other
backends are compared against.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from graphrl import signatures as sig
from graphrl.errors import ExecutionError, GraphRLError, OpError
from graphrl.evaluation import due, run_attrs
from graphrl.finite import check_op_outputs
from graphrl.graph import CALL, OP, SYSTEM, Graph, Node
from graphrl.sampling import variable_values
from graphrl.timeline import Event
from graphrl.trace import Program
from graphrl.types import PayloadSpec

from .engines.base import ModelEngine
from .engines.registry import create_engine
from .engines.hf import seed_for


CARRIED_FILE = "carried.pt"   # a checkpoint's queued payloads of an async run


@dataclass(frozen=True)
class WeightsToken:
    """The runtime value of a Weights edge: which model, at which version."""

    model: str
    version: int


@dataclass(frozen=True)
class StepResult:
    outputs: dict[str, Any]   # graph output name (without %) -> payload dict
    events: tuple[Event, ...]
    seconds: float
    warmup: bool = False      # an async step that only generated (its queue was empty)


def check_payload(node: Node, spec: PayloadSpec, value: Any, variable: bool = False) -> None:
    """Raise if an engine or op returned something other than its declared payload;
    `variable`: its batch may be smaller than declared (after dynamic sampling:
    graphrl/sampling.py), at least 1 row."""
    if spec.is_weights:
        return
    if not isinstance(value, Mapping):
        raise ExecutionError(f"node {node.name} ({node.call}) returned "
                             f"{type(value).__name__}, expected a {spec.kind} payload dict")
    want = {f.name for f in spec.fields}
    if set(value) != want:
        raise ExecutionError(f"node {node.name} ({node.call}) returned fields "
                             f"{sorted(value)}, its {spec.kind} payload declares {sorted(want)}")
    for f in spec.fields:
        shape = tuple(getattr(value[f.name], "shape", ()))
        want = f.shape(spec.batch, spec.seq)
        if variable and shape and shape[1:] == want[1:] and 1 <= shape[0] <= want[0]:
            continue
        if shape != want:
            raise ExecutionError(f"node {node.name} ({node.call}): field {f.name} has shape "
                                 f"{shape}, {spec.text()} declares "
                                 f"{f.shape(spec.batch, spec.seq)}")


class LocalExecutor:
    """Runs a Program step by step. `engines` may be passed in to share them."""

    def __init__(self, program: Program, device: str = "cpu", seed: int = 0,
                 engines: Mapping[str, ModelEngine] | None = None):
        self.program, self.graph, self.seed = program, program.graph, seed
        self.engines = dict(engines) if engines is not None else self._create(device)
        self.carried: dict[str, Any] | None = None  # set at the first step
        self._dead = self.graph.last_uses()
        self._variable = variable_values(self.graph)
        self._clock0 = time.perf_counter()

    def _create(self, device: str) -> dict[str, ModelEngine]:
        from graphrl.architecture import refuse_unsupported

        for name, m in self.program.models.items():   # before any engine is built
            refuse_unsupported(name, m.engine, m.spec.arch)
        engines = {name: create_engine(m.engine, m.decl(), m.engine_options(), device, self.seed)
                   for name, m in self.program.models.items() if not m.shares_base}
        for name, m in self.program.models.items():   # runs on its owner's module (LoRA)
            if m.shares_base:
                from .engines.lora_hf import SharedBase

                engines[name] = SharedBase(m.decl(), engines[m.shares_base])
        for name, m in self.program.models.items():
            if m.init_from:
                engines[name].load_weights(engines[m.init_from].export_weights())
        return engines

    def now(self) -> float:
        return time.perf_counter() - self._clock0

    def prepare(self, fn: Callable[[Mapping[str, ModelEngine]], Mapping[str, float]]
                ) -> dict[str, float]:
        """Run an Experiment's set-up (e.g. reward-model training) on the engines; a
        frozen model it trained is held in its precision only again afterwards."""
        out = dict(fn(self.engines))
        for engine in self.engines.values():
            if hasattr(engine, "hold_frozen"):
                engine.hold_frozen()
        return out

    def close(self) -> None:
        """Nothing to release in one process (the Executor interface)."""

    def export_weights(self, model: str) -> dict[str, Any]:
        """The full weights of `model` as they are now (copies)."""
        return self.engines[model].export_weights()

    # -- checkpoints (graphrl.checkpoint) ----------------------------------------------------
    def model_shapes(self) -> dict[str, dict[str, list[int]]]:
        """Model -> parameter name -> shape (what a checkpoint must match)."""
        from graphrl.checkpoint import shapes_of

        return {name: shapes_of(e.module.state_dict().items())
                for name, e in sorted(self.engines.items())}

    def save_state(self, folder: Any) -> dict[str, Any]:
        """Write every engine's state (weights, optimizer, version) under `folder`/models;
        returns the placement summary for the manifest."""
        from pathlib import Path

        from graphrl.checkpoint import save_torch

        for name, engine in sorted(self.engines.items()):
            save_torch(engine.state_dict(), Path(folder) / "models" / f"{name}.pt")
        queued = {k: v for k, v in (self.carried or {}).items()
                  if not isinstance(v, WeightsToken)}
        if queued:   # async steps (--staleness): rollouts generated, not yet trained on
            save_torch(queued, Path(folder) / CARRIED_FILE)
        return {"backend": "local"}

    def load_state(self, ckpt: Any) -> None:
        """Restore the engines from a verified checkpoint (graphrl.checkpoint.Checkpoint),
        written here or on Ray (per-model files, or the shards of megatron-core and
        DeepSpeed engines put together); the next step reads the weights at their
        restored versions."""
        from pathlib import Path

        from graphrl.checkpoint import load_torch

        from .engines.shard_state import read_model_state

        for name, engine in sorted(self.engines.items()):
            engine.load_state_dict(read_model_state(Path(ckpt.path) / "models", name))
        self.carried = None
        if ckpt.file(CARRIED_FILE).is_file():
            self.carried = {v.name: WeightsToken(v.spec.model, self.engines[v.spec.model].version)
                            for v in self.graph.inputs if v.spec.is_weights}
            self.carried |= load_torch(ckpt.file(CARRIED_FILE))

    streams_ahead = True   # run_step takes the next step's inputs (streamed generation)

    def run_step(self, inputs: Mapping[str, Any], iteration: int = 0,
                 upcoming: Mapping[str, Any] | None = None) -> StepResult:
        """One step; `upcoming`: the next step's inputs, which a streamed generate node
        (backends/stream_generation.py) may start on in this step's tail."""
        g = self.graph
        if self.carried is None:  # weights enter at whatever version set-up left them
            self.carried = {v.name: WeightsToken(v.spec.model, self.engines[v.spec.model].version)
                            for v in g.inputs if v.spec.is_weights}
        env: dict[str, Any] = dict(self.carried)
        queued = dict(g.carries)
        for v in g.inputs:
            if v.spec.is_weights or v.name in queued:   # queue stages come from carries
                continue
            key = v.name.lstrip("%")
            if key not in inputs:
                raise ExecutionError(f"step @{g.name}: input {key!r} was not given "
                                     f"(given: {', '.join(inputs) or 'none'})")
            env[v.name] = inputs[key]
        events: list[Event] = []
        t0 = self.now()
        warmup = any(v.name in queued and v.name not in env for v in g.inputs)
        tails = []   # streamed generate nodes: their tails run after the step's trains
        for n in g.nodes:
            if warmup and not all(i in env for i in n.inputs):
                continue   # an async step's first steps only generate (passes/staleness)
            if not due(n, iteration):
                continue   # an eval node between evaluations (graphrl.evaluation)
            if n.attr("stream_cut"):
                tails.append(n)
                events.append(self._stream_half(n, env, iteration, None))
                continue
            start = self.now()
            try:
                results = self.run_node(n, [env[i] for i in n.inputs], iteration)
            except OpError as e:   # an op's user code: add the iteration
                raise e.at(iteration) from e
            except GraphRLError:
                raise
            except Exception as e:  # name the node; keep the cause for debugging
                raise ExecutionError(f"node {n.name} ({n.call}) failed at iteration "
                                     f"{iteration}: {type(e).__name__}: {e}") from e
            end = self.now()
            for v, r in zip(n.outputs, results):
                check_payload(n, v.spec, r, v.name in self._variable)
                env[v.name] = r
            if n.kind == OP:
                check_op_outputs(n, results, iteration)
            events.append(Event(n.name, n.call, n.model, "local", start, end, iteration))
            for dead in self._dead.get(n.name, ()):
                env.pop(dead, None)
        for n in tails:
            events.append(self._stream_half(n, env, iteration, upcoming or {}))
        # a value a warm-up step did not make (no train ran) carries over unchanged
        self.carried = dict(self.carried) | {dst: env[src] for dst, src in g.carries
                                             if src in env}
        outputs = {o.lstrip("%"): env[o] for o in g.outputs if o in env}
        return StepResult(outputs, tuple(events), self.now() - t0, warmup)

    def _stream_half(self, n: Node, env: dict[str, Any], iteration: int,
                     upcoming: Mapping[str, Any] | None) -> Event:
        """The head (upcoming None) or the tail of a streamed generate node."""
        from . import stream_generation as sg

        engine, start = self.engines[n.model], self.now()
        seed_of = lambda it: seed_for(self.seed, it, n.name)  # noqa: E731
        try:
            if upcoming is None:
                sg.local_head(self, n, engine, env[n.inputs[1]], seed_of(iteration),
                              env[n.inputs[0]].version, iteration)
            else:
                for v, r in zip(n.outputs, sg.local_tail(self, n, engine, engine.version,
                                                         iteration, upcoming, seed_of)):
                    check_payload(n, v.spec, r)
                    env[v.name] = r
        except GraphRLError:
            raise
        except Exception as e:
            raise ExecutionError(f"node {n.name} ({n.call}) failed at iteration "
                                 f"{iteration}: {type(e).__name__}: {e}") from e
        return Event(n.name, n.call, n.model, "local", start, self.now(), iteration)

    # -- one node ---------------------------------------------------------------------
    def run_node(self, n: Node, args: list[Any], iteration: int) -> list[Any]:
        seed = seed_for(self.seed, iteration, n.name)
        if n.kind == OP and n.attr("head_part"):   # graphrl/stream_train.py
            from .stream_parts import split_op

            attrs = {k: v for k, v in n.attr_dict.items() if k != "head_part"}
            return split_op(self.program.ops[n.target].fn, args, attrs,
                            self._head_mask(next(a for a in args if "response_mask" in a)))
        if n.kind == OP:
            out = self.program.ops[n.target].fn(*args, **run_attrs(n))
            return list(out) if isinstance(out, tuple) else [out]
        if n.kind == CALL:
            return self.run_call(n, args, seed)
        if n.kind == SYSTEM:
            return self.run_system(n, args)
        raise ExecutionError(f"node {n.name}: unknown kind {n.kind!r}")

    def run_call(self, n: Node, args: list[Any], seed: int) -> list[Any]:
        engine = self.engines[n.model]
        weights, data = args[0], args[1:]
        if weights.version != engine.version:
            raise ExecutionError(f"node {n.name} ({n.call}) reads {n.model} weights version "
                                 f"{weights.version} but the engine holds {engine.version}")
        attrs = run_attrs(n)
        if n.target == "generate" and attrs.pop("behaviour", False):
            from .async_steps import behaviour_outputs

            rollout = engine.generate(data[0], seed=seed, **attrs)
            return behaviour_outputs(engine, rollout, weights.version)
        if n.target == "generate":
            return [engine.generate(data[0], seed=seed, **attrs)]
        if n.target == "forward" and attrs.get("head_part"):   # graphrl/stream_train.py
            from .stream_parts import cut_and_samples, split_forward, stream_source

            return [split_forward(engine, data[0], *cut_and_samples(
                stream_source(self.graph)))]
        if n.target == "forward":
            return [engine.forward(data[0])]
        if n.target == "train":
            import torch

            loss = self.program.loss(attrs.pop("loss"))
            names = loss.input_names(len(data))
            if "staleness" in attrs:
                from .async_steps import check_versions

                check_versions(n, dict(zip(names, data)), engine.version,
                               attrs.pop("staleness"))
            if attrs.pop("head_part", False):   # graphrl/stream_train.py
                from .stream_parts import split_train

                named = dict(zip(names, data))
                stats = split_train(engine, named, self._head_mask(named["rollout"]),
                                    loss=loss, seed=seed, **attrs)
            else:
                stats = engine.train(dict(zip(names, data)), loss=loss, seed=seed, **attrs)
            return [WeightsToken(n.model, engine.version),
                    {k: torch.tensor([float(stats[k])]) for k in loss.stats}]
        raise ExecutionError(f"node {n.name}: unknown method {n.target!r}")

    def _head_mask(self, rollout: Mapping[str, Any]) -> Any:
        """Which rows of a streamed rollout form its head part (stream_parts)."""
        from .stream_parts import cut_and_samples, head_mask, stream_source

        return head_mask(rollout, *cut_and_samples(stream_source(self.graph)))

    def run_system(self, n: Node, args: list[Any]) -> list[Any]:
        """In one process weights have one layout: reshard is the identity; offload and
        onload move an engine's tensors between device and host."""
        if n.target in ("offload", "onload"):
            getattr(self.engines[n.model], n.target)()
        return list(args[: len(n.outputs)])
