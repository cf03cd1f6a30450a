"""Timelines: what ran where and when, measured by a backend or predicted by simulate.

Both kinds export the same Chrome trace JSON (chrome://tracing, ui.perfetto.dev): one
complete event ("ph": "X") per node run, a process per worker (mesh or rank), a thread
per model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Event:
    node: str        # node name, e.g. %rollout
    call: str        # policy.generate, gae, reshard[policy]
    model: str       # "" for ops
    worker: str      # local, rank3, mesh 0-3, ...
    start: float     # seconds from the start of the run
    end: float
    iteration: int = 0
    nbytes: int = 0  # bytes moved (reshard, send/recv)
    ran: str = ""    # engine and degrees that ran a call (graphrl.engines.degrees_text)

    @property
    def seconds(self) -> float:
        return self.end - self.start


def chrome_trace(events: Iterable[Event], source: str) -> dict:
    """A Chrome trace dict; `source` is "measured" or "predicted"."""
    out = []
    for e in events:
        out.append({"name": e.call, "cat": e.model or "op", "ph": "X", "pid": e.worker,
                    "tid": e.model or "ops", "ts": round(e.start * 1e6, 3),
                    "dur": round(e.seconds * 1e6, 3),
                    "args": {"node": e.node, "iteration": e.iteration, "bytes": e.nbytes,
                             **({"ran": e.ran} if e.ran else {})}})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": {"source": source}}


def write_chrome_trace(path: str | Path, events: Iterable[Event], source: str) -> None:
    from .outputs import atomic_write_text

    atomic_write_text(path, json.dumps(chrome_trace(events, source), indent=1))


def read_chrome_trace(path: str | Path) -> list[Event]:
    data = json.loads(Path(path).read_text())
    return [Event(e["args"]["node"], e["name"], "" if e["cat"] == "op" else e["cat"],
                  str(e["pid"]), e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6,
                  e["args"].get("iteration", 0), e["args"].get("bytes", 0),
                  e["args"].get("ran", ""))
            for e in data["traceEvents"]]


def seconds_per_call(events: Iterable[Event]) -> dict[str, float]:
    """Total seconds per call name."""
    totals: dict[str, float] = {}
    for e in events:
        totals[e.call] = totals.get(e.call, 0.0) + e.seconds
    return totals


def call_seconds(events: Iterable[Event]) -> dict[str, float]:
    """Total seconds per call name, each run of a node counted once: a node that ran on
    several workers (a gang of GPUs) spans its first start to its last end."""
    spans: dict[tuple[int, str, str], tuple[float, float]] = {}
    for e in events:
        key = (e.iteration, e.node, e.call)
        start, end = spans.get(key, (e.start, e.end))
        spans[key] = (min(start, e.start), max(end, e.end))
    totals: dict[str, float] = {}
    for (_, _, call), (start, end) in spans.items():
        totals[call] = totals.get(call, 0.0) + end - start
    return totals
