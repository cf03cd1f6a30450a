"""Plan: per-worker instruction streams, the compiler's output and the executors' input.

A worker is a GPU (its global id) or the host (-1), which runs ops. Each stream is the
worker's instructions in order; `deps` names instructions on other streams that must
finish first. Instruction ops:

  run      run a graph node; every GPU of the node's mesh runs it together (a gang)
  send     send `value` to GPU `peer` (-1: the host); pairs with the peer's recv
  recv     receive `value` from `peer`
  reshard  this GPU's part of a weight reshard (`nbytes` it sends), a gang over the
           union of the source and destination meshes
  offload  move `model`'s state to host memory; onload brings it back
  free     `value` is dead on this worker

Ids are `w<worker>.<index>` (`host.<index>` for the host), deterministic. `seconds` is
the cost model's prediction, `mem` the peak bytes a run needs on the GPU (its own model
state included); `resident` lists each model's bytes per GPU between calls.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from .cluster import ClusterSpec, gpu_type
from .graph import Graph

HOST = -1
OPS = ("run", "send", "recv", "reshard", "offload", "onload", "free")


def worker_name(worker: int) -> str:
    return "host" if worker == HOST else f"w{worker}"


@dataclass(frozen=True)
class Instr:
    id: str
    op: str
    node: str = ""       # graph node (run, reshard)
    value: str = ""      # value moved or freed (send, recv, free)
    model: str = ""
    label: str = ""      # what a person reads: policy.generate, send %rollout
    peer: int = HOST     # send/recv partner
    nbytes: int = 0
    seconds: float = 0.0
    mem: int = 0
    deps: tuple[str, ...] = ()
    part: str = ""       # a micro-batch of a streamed run: "1/4"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"instruction {self.id}: unknown op {self.op!r}")

    @property
    def gang(self) -> str:
        """Instructions with the same gang key start together (a collective)."""
        if self.op in ("run", "reshard"):
            return f"{self.op}:{self.node}" + (f":{self.part}" if self.part else "")
        return self.id


@dataclass(frozen=True)
class Stream:
    worker: int
    instrs: tuple[Instr, ...]


@dataclass(frozen=True)
class Plan:
    graph: Graph
    cluster: ClusterSpec
    policy: str
    streams: tuple[Stream, ...]
    predicted_step_seconds: float
    resident: tuple[tuple[int, str, int], ...] = ()   # (gpu, unit, bytes); unit = a model,
                                                      # or `<model>.generate` for its copy
    notes: tuple[tuple[str, str], ...] = ()          # search findings for people

    def instrs(self) -> Iterator[tuple[int, Instr]]:
        for s in self.streams:
            for i in s.instrs:
                yield s.worker, i

    def stream(self, worker: int) -> Stream:
        for s in self.streams:
            if s.worker == worker:
                return s
        raise KeyError(worker)

    @property
    def workers(self) -> tuple[int, ...]:
        return tuple(s.worker for s in self.streams)

    # -- JSON ------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "format": "graphrl-plan/1",
            "graph": self.graph.text(),
            "cluster": {"nodes": self.cluster.nodes, "gpus_per_node": self.cluster.gpus_per_node,
                        "gpu": self.cluster.gpu.name},
            "policy": self.policy,
            "predicted_step_seconds": self.predicted_step_seconds,
            "resident": [list(r) for r in self.resident],
            "notes": [list(n) for n in self.notes],
            "streams": [{"worker": s.worker, "instrs": [_instr_json(i) for i in s.instrs]}
                        for s in self.streams],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        from .parser import parse_graph

        d = json.loads(text)
        if d.get("format") != "graphrl-plan/1":
            raise ValueError("not a graphrl plan (format graphrl-plan/1)")
        c = d["cluster"]
        cluster = ClusterSpec(c["nodes"], c["gpus_per_node"], gpu_type(c["gpu"]))
        streams = tuple(Stream(s["worker"], tuple(
            Instr(**{**i, "deps": tuple(i.get("deps", ()))}) for i in s["instrs"]))
            for s in d["streams"])
        return cls(parse_graph(d["graph"]), cluster, d["policy"], streams,
                   d["predicted_step_seconds"], tuple(tuple(r) for r in d["resident"]),
                   tuple(tuple(n) for n in d["notes"]))


def _instr_json(i: Instr) -> dict[str, Any]:
    d = asdict(i)
    defaults = Instr("", "run")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
            if k in ("id", "op") or v != getattr(defaults, k)}


@dataclass
class StreamBuilder:
    """Appends instructions to per-worker streams with deterministic ids."""

    streams: dict[int, list[Instr]] = field(default_factory=dict)

    def add(self, worker: int, op: str, **kw: Any) -> Instr:
        lst = self.streams.setdefault(worker, [])
        instr = Instr(f"{worker_name(worker)}.{len(lst)}", op, **kw)
        lst.append(instr)
        return instr

    def build(self) -> tuple[Stream, ...]:
        return tuple(Stream(w, tuple(self.streams[w])) for w in sorted(self.streams))
