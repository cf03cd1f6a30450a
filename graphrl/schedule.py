"""The schedule a placed graph carries: what `lower` needs, printed in the IR.

assign-devices annotates every node it schedules with a `Timing` (when it starts and ends
in the search's predicted schedule, its seconds, peak and resident bytes per GPU, its
onload/offload seconds) and the graph with a `Schedule` (what the compile was for: the
cluster, generation engine, response lengths, memory headroom, policy; and what the
search chose for the whole step: the streaming factor and the GPUs that offload). Both
print in the graph's text form and parse back exactly (floats as `repr`), so a dumped
placed graph lowers to the same plan with nothing else at hand (passes/lower.py).

    schedule {cluster="2x8xH100", gen_engine="graph", headroom=0.08, lengths="fixed:512", offloaded="none", policy="auto", search_step=1.25, stream=1}
    %rollout = call generate[policy](...) : ... @[0-7]{dp=8} at{end=0.91, peak=123, resident=0, start=0.0, seconds=0.91}
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

NO_GPUS = "none"


def gpus_text(gpus: tuple[int, ...]) -> str:
    return ",".join(map(str, gpus)) or NO_GPUS


def parse_gpus(text: str) -> tuple[int, ...]:
    return () if text in ("", NO_GPUS) else tuple(int(g) for g in text.split(","))


def _fields_of(keys: dict[str, str], kv: dict[str, Any], required: set[str],
               what: str) -> dict[str, Any]:
    """Text-form keys -> field values; unknown or missing keys are ValueErrors."""
    names = {short: long for long, short in keys.items()}
    bad = sorted(set(kv) - set(names))
    if bad:
        raise ValueError(f"unknown {what} key(s) {', '.join(bad)} (known: "
                         f"{', '.join(sorted(names))})")
    missing = sorted(required - set(kv))
    if missing:
        raise ValueError(f"{what} needs {', '.join(missing)}")
    return {names[k]: v for k, v in kv.items()}


@dataclass(frozen=True)
class Timing:
    """One node in the search's predicted schedule (passes/search.py `Scheduled`)."""

    start: float
    end: float
    seconds: float              # the run itself (a call's strategy; an op's fixed cost)
    peak_bytes: int = 0         # per GPU while it runs
    resident_bytes: int = 0     # what its unit keeps on each GPU between calls
    offload_seconds: float = 0.0   # onload + offload of its unit's state, when offloaded

    KEYS = {"start": "start", "end": "end", "seconds": "seconds", "peak_bytes": "peak",
            "resident_bytes": "resident", "offload_seconds": "offload"}

    def attrs(self) -> tuple[tuple[str, Any], ...]:
        """Key-value pairs of the text form, sorted by key; zero bytes/offload omitted."""
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("peak_bytes", "resident_bytes", "offload_seconds") and not v:
                continue
            out.append((self.KEYS[f.name], v))
        return tuple(sorted(out))

    @classmethod
    def from_attrs(cls, kv: dict[str, Any]) -> "Timing":
        args = _fields_of(cls.KEYS, kv, {"start", "end", "seconds"}, "timing")
        for k in ("start", "end", "seconds", "offload_seconds"):
            if k in args:
                args[k] = float(args[k])
        for k in ("peak_bytes", "resident_bytes"):
            if k in args:
                if isinstance(args[k], bool) or not isinstance(args[k], int):
                    raise ValueError(f"timing {cls.KEYS[k]} must be an integer")
        return cls(**args)


@dataclass(frozen=True)
class Schedule:
    """What a placed graph was compiled for and the step-wide choices of its schedule."""

    cluster: str                 # ClusterSpec.text()
    gen_engine: str
    lengths: str                 # graphrl.lengths exact text; "" = every response max length
    headroom: float
    policy: str
    stream: int = 1              # micro-batches rollouts stream in (1: no streaming)
    offloaded_gpus: tuple[int, ...] = ()
    search_step_seconds: float = 0.0   # the search's own estimate (lower simulates the plan)

    KEYS = {"cluster": "cluster", "gen_engine": "gen_engine", "lengths": "lengths",
            "headroom": "headroom", "policy": "policy", "stream": "stream",
            "offloaded_gpus": "offloaded", "search_step_seconds": "search_step"}

    def attrs(self) -> tuple[tuple[str, Any], ...]:
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "offloaded_gpus":
                v = gpus_text(v)
            out.append((self.KEYS[f.name], v))
        return tuple(sorted(out))

    @classmethod
    def from_attrs(cls, kv: dict[str, Any]) -> "Schedule":
        args = _fields_of(cls.KEYS, kv, {"cluster", "gen_engine", "policy"}, "schedule")
        for k in ("cluster", "gen_engine", "lengths", "policy"):
            if k in args and not isinstance(args[k], str):
                raise ValueError(f"schedule {cls.KEYS[k]} must be a string")
        if "offloaded_gpus" in args:
            args["offloaded_gpus"] = parse_gpus(str(args["offloaded_gpus"]))
        for k in ("headroom", "search_step_seconds"):
            if k in args:
                args[k] = float(args[k])
        if "stream" in args:
            if isinstance(args["stream"], bool) or not isinstance(args["stream"], int) \
                    or args["stream"] < 1:
                raise ValueError("schedule stream must be an integer >= 1")
        return cls(**args)


__all__ = ["Timing", "Schedule", "gpus_text", "parse_gpus"]
