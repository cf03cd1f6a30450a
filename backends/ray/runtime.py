"""The executor's side of a rank: `ExecWorker` runs graph nodes on the engines of its GPU.

`ExecWorker` extends `RankWorker` (process groups, engines, resharding) with what
`executor.RayExecutor` sends it: `build` an engine from an `EngineSpec`, `run` one call
node's share of the batch from a `CallSpec`, `reshard_node` (a TransferPlan between two
of its engines), each returning a `Stamp` (what ran, when, bytes sent) beside the result,
so the driver learns that a call finished, and its timeline, from one small object.

Data arrive as the parts (Ray objects, resolved by Ray before the call) of each input
payload: the payload is their concatenation along the batch dimension; a rank slices out
the rows it computes. Engine kinds:

- `fsdp`: FSDP2 over the mesh (`sharded.FSDPEngine`); every call on it is a collective of
  the mesh's ranks, each with its slice of the batch.
- `replicas`: a full copy on each rank (`sharded.ReplicatedEngine`); with `group` set,
  training averages gradients over the group after every backward (data-parallel, as
  DDP does), so the copies stay identical.
- a spec with `base` (a LoRA policy's shared base): no engine of its own;
  `lora_hf.SharedBase` runs its calls on the owner's engine of this rank (the `base`
  key), with the adapters off.
- `noop`: no model; calls return zeros of the declared payload shapes (dispatch-overhead
  measurements).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from graphrl import signatures as sig
from graphrl.errors import UsageError
from graphrl.types import PayloadSpec

from ..engines.train_loop import loss_function
from .specs import CallSpec, EngineSpec, Stamp
from .worker import RankWorker


def _cat(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(parts) == 1:
        return dict(parts[0])
    return {f: torch.cat([p[f] for p in parts]) for f in parts[0]}


def _rows(payload: Mapping[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {f: t[lo:hi] for f, t in payload.items()}


class NoopEngine:
    """Stands in for a model: no weights, outputs of the right shapes."""

    layout = None

    def __init__(self) -> None:
        self.version = 0

    def local_arrays(self) -> dict[str, list[torch.Tensor]]:
        return {}

    def offload(self) -> None:
        pass

    def onload(self) -> None:
        pass


def zeros_payload(spec: PayloadSpec, rows: int) -> dict[str, torch.Tensor]:
    dtypes = {"i64": torch.int64, "i32": torch.int32}
    return {f.name: torch.zeros((rows,) + tuple(f.shape(spec.batch, spec.seq))[1:],
                                dtype=dtypes.get(f.dtype, torch.float32))
            for f in spec.fields}


KILL_ENV = "GRAPHRL_TEST_KILL_RANK"   # tests only: "RANK:ITERATION:CALL:MARKER_FILE[:TIMES]"


def _test_kill(rank: int, spec: CallSpec) -> None:
    """Test hook (tests/test_checkpoint_ray.py): this rank's process kills itself with
    SIGKILL at the named call and iteration, TIMES times in all (default once; the marker
    file counts the kills, so a restarted rank replaying the iteration dies again)."""
    import os
    import signal

    want = os.environ.get(KILL_ENV)
    if not want:
        return
    r, it, call, rest = want.split(":", 3)
    marker, _, times = rest.partition(":")
    if (int(r), int(it), call) != (rank, spec.iteration, spec.call):
        return
    done = int(open(marker).read() or 0) if os.path.exists(marker) else 0
    if done < int(times or 1):
        with open(marker, "w") as f:
            f.write(str(done + 1))
        os.kill(os.getpid(), signal.SIGKILL)


class ExecWorker(RankWorker):
    """A RankWorker that runs call nodes for `executor.RayExecutor`."""

    def clock(self) -> float:
        return time.time()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    # -- engines ----------------------------------------------------------------------------
    def build(self, spec: EngineSpec) -> Any:
        """Build `spec`'s engine on this rank (fsdp: a collective of its ranks); returns
        its layout (None for noop)."""
        if spec.kind == "noop":
            self._add(spec.key, NoopEngine())
            return None
        if spec.base:   # a shared base (LoRA): its owner's engine with the adapters off
            from ..engines.lora_hf import SharedBase

            self._add(spec.key, SharedBase(spec.decl, self.engine(spec.base)))
            return None
        if spec.kind == "fsdp":
            layout = self.build_fsdp_engine(spec.key, spec.decl, spec.options, spec.group,
                                            seed=spec.seed)
        elif spec.kind in ("megatron", "deepspeed"):
            layout = self._build_sharded(spec)
        elif spec.kind == "replicas":
            layout = self.build_replicated_engine(spec.key, spec.decl, spec.options,
                                                  list(spec.gpus), seed=spec.seed)
            if spec.group:
                self._average_gradients(spec.key, spec.group)
        else:
            raise UsageError(f"engine {spec.key}: unknown kind {spec.kind!r}")
        if spec.init_from is not None:
            from ..engines.registry import create_engine

            options = {"checkpoint": spec.init_checkpoint} if spec.init_checkpoint else {}
            source = create_engine("hf", spec.init_from, options, "cpu", spec.seed)
            self.engine(spec.key).load_weights(source.export_weights())
        return layout

    def _member_groups(self, spec: EngineSpec) -> dict[str, Any]:
        """kind -> this rank's group of that kind, among the groups `spec` names
        (`<mesh>/<kind>/<i>`; the mesh group itself is `mesh`)."""
        out = {}
        for name in spec.groups:
            ranks, pg = self._groups.get(name, ((), None))
            if pg is None:
                continue
            kind = name.split("/")[1] if "/" in name else "mesh"
            out[kind] = pg
        return out

    def _build_sharded(self, spec: EngineSpec) -> Any:
        """A megatron-core or DeepSpeed engine over the mesh, with the plan's degrees (a
        collective over the mesh's ranks); returns its layout."""
        from ..engines.registry import RankMesh, create_engine

        s = spec.strategy
        mesh = RankMesh(tuple(spec.gpus), self.rank, self._member_groups(spec), s,
                        sequence_parallel=s.tp > 1)
        eng = create_engine(spec.kind, spec.decl, spec.options, self.device, spec.seed, mesh)
        self._add(spec.key, eng)
        return getattr(eng, "layout", None)

    def degrees(self, key: str) -> dict[str, Any]:
        """The engine and the degrees it ran its last call with on this rank (megatron,
        DeepSpeed: as they report; HF modules: data-parallel over the mesh, FSDP2 = ZeRO-3,
        one micro-batch, no optimizer offload)."""
        from ..engines.lora_hf import SharedBase

        eng = self.engine(key)
        if isinstance(eng, SharedBase):   # it runs on its owner's engine
            eng = eng.owner
        if hasattr(eng, "degrees"):
            return eng.degrees()
        if isinstance(eng, NoopEngine):
            return {"engine": "noop"}
        from ..engines.fast import FastEngine

        kind = type(eng).__name__
        n = len(getattr(eng, "gpus", (self.rank,)))
        inner = getattr(eng, "engine", None)
        return {"engine": "fast" if isinstance(inner, FastEngine) else "hf", "dp": n,
                "tp": 1, "pp": 1, "sp": False, "zero": 3 if kind == "FSDPEngine" else 0,
                "micro_batches": 1, "offload": 0, "precision": eng.ran_precision(),
                "as": "fsdp2" if kind == "FSDPEngine" else "replicas"}

    def _average_gradients(self, key: str, group: str) -> None:
        """Data-parallel replicas: after each backward, all-reduce the gradients (one
        flat message) over `group` and divide by its size, as DDP does."""
        ranks, pg = self._group(group)
        hf = self.engine(key).engine
        params = [p for p in hf.module.parameters() if p.requires_grad]

        def average() -> None:
            grads = [p.grad for p in params if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=pg)
            flat /= len(ranks)
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()
        hf.after_backward = average

        def sum_over_ranks(t: torch.Tensor) -> None:   # the adaptive KL stat
            on = t.to(params[0].device)
            dist.all_reduce(on, group=pg)
            t.copy_(on.cpu())
        hf.sum_over_ranks = sum_over_ranks

    # -- calls ------------------------------------------------------------------------------
    def run(self, spec: CallSpec, *parts: Any) -> tuple[Any, Stamp]:
        """Run this rank's share of a call node; returns (payload, stamp)."""
        start = time.time()
        _test_kill(self.rank, spec)
        data, k = [], 0
        for inp in spec.inputs:
            data.append((_cat(parts[k:k + inp.parts]), inp.first))
            k += inp.parts
        engine = self.engine(spec.engine)
        attrs = dict(spec.attrs)
        if isinstance(engine, NoopEngine):
            out = self._noop(spec, engine)
        elif spec.method.startswith("stream_"):   # streamed generation (async steps)
            from .stream_calls import run_stream

            out = run_stream(self, engine, spec, data)
        elif spec.method == "generate":
            (prompts, first), = data
            lo, hi = spec.rows or (0, spec.total)
            samples = int(attrs.get("samples", 1))
            out = engine.generate(_rows(prompts, lo - first, hi - first), seed=spec.seed,
                                  noise_rows=(lo * samples, spec.total * samples), **attrs)
        elif spec.method == "forward":
            (rollout, first), = data
            lo, hi = spec.rows or (0, spec.total)
            out = engine.forward(_rows(rollout, lo - first, hi - first))
        elif spec.method == "train":
            loss = loss_function(spec.model, attrs.pop("loss"))   # the driver's LossDef
            names = loss.input_names(len(data))
            stats = engine.train(dict(zip(names, (d for d, _ in data))), loss=loss,
                                 seed=spec.seed, shard=spec.shard, **attrs)
            out = {k: torch.tensor([float(stats[k])]) for k in loss.stats}
        else:
            raise UsageError(f"node {spec.node}: unknown method {spec.method!r}")
        from graphrl.engines import degrees_text

        return out, Stamp(spec.node, spec.call, spec.model, self.rank, start, time.time(),
                          spec.iteration, ran=degrees_text(self.degrees(spec.engine)))

    def _noop(self, spec: CallSpec, engine: NoopEngine) -> Any:
        if spec.method == "train":
            engine.version += 1
            loss = loss_function(spec.model, dict(spec.attrs)["loss"])
            return {k: torch.zeros(1) for k in loss.stats}
        lo, hi = spec.rows or (0, spec.total)
        samples = int(dict(spec.attrs).get("samples", 1)) if spec.method == "generate" else 1
        return zeros_payload(spec.output, (hi - lo) * samples)

    def reshard_node(self, node: str, call: str, model: str, iteration: int, plan: Any,
                     src: str, dst: str, *, wire_dtype: str = "float32",
                     timeout_s: float = 60.0) -> tuple[Any, Stamp]:
        """This rank's part of a reshard node; returns (ReshardStats or None, stamp)."""
        start = time.time()
        stats = None
        if plan is not None:   # None: noop engines
            stats = self.reshard(plan, src, dst, wire_dtype=wire_dtype, timeout_s=timeout_s)
        return stats, Stamp(node, call, model, self.rank, start, time.time(), iteration,
                            stats.sent_bytes if stats is not None else 0)

    # -- checkpoints (ray/state.py) ----------------------------------------------------------
    def save_state(self, folder: str, engines: Sequence[tuple[str, bool]]) -> list[str]:
        """Write this rank's RNG states and, for each (engine, write) in order: a sharded
        engine (megatron-core, DeepSpeed) writes its own shard, models/<engine>/rank<R>.pt
        (no collective); any other joins the engine's state_dict (a collective for FSDP)
        and writes it when `write` (the engine's first rank): models/<engine>.pt. Returns
        the files written."""
        from pathlib import Path

        from graphrl.checkpoint import rng_state, save_torch

        root, written = Path(folder), []
        save_torch(rng_state(), root / "rng" / f"rank{self.rank}.pt")
        written.append(f"rng/rank{self.rank}.pt")
        for key, write in engines:
            engine = self.engine(key)
            if hasattr(engine, "save_shards"):
                written += [f"models/{key}/{f}" for f in
                            engine.save_shards(root / "models" / key)]
                continue
            state = engine.state_dict()
            if write:
                save_torch(state, root / "models" / f"{key}.pt")
                written.append(f"models/{key}.pt")
        return written

    def load_state(self, folder: str, engines: Sequence[tuple[str, str]]) -> dict[str, int]:
        """Load, for each (engine, model) in order, the model's full state (one file, or
        its shards put together: engines/shard_state.py): the whole state into the
        model's own engine (each takes its part), the weights into a generation engine;
        and this rank's RNG states when the checkpoint has them. Returns model -> version."""
        from pathlib import Path

        from graphrl.checkpoint import load_torch, set_rng_state

        from ..engines.shard_state import read_model_state

        root, versions = Path(folder), {}
        for key, model in engines:
            state = read_model_state(root / "models", model)
            versions[model] = int(state["version"])
            if key == model:
                self.engine(key).load_state_dict(state)
            else:
                self.engine(key).load_weights(state["weights"])
        rng = root / "rng" / f"rank{self.rank}.pt"
        if rng.is_file():
            set_rng_state(load_torch(rng))
        return versions

    def memory_op(self, op: str, key: str, node: str, iteration: int) -> tuple[None, Stamp]:
        """offload / onload an engine."""
        start = time.time()
        getattr(self.engine(key), op)()
        return None, Stamp(node, f"{op}[{key}]", key, self.rank, start, time.time(), iteration)


__all__ = ["ExecWorker", "NoopEngine", "zeros_payload"]
