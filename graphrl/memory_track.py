"""Memory per GPU over a plan's predicted step: what each GPU holds and when.

A GPU holds the state of every unit resident on it between calls (`Plan.resident`: a
model's weights / Adam states, `<model>.generate` for a policy's generation copy),
except while that state is offloaded to host memory (offload ... onload); while a call
runs it holds the call's peak (`Instr.mem`, its own unit's state included) plus the
other units present. `verify_plan` checks the peaks against the GPU's capacity; the
Gantt chart (graphrl/dump.py) draws the whole curve under the timeline, at the times
`simulate.schedule` gives each instruction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .plan import HOST, Instr, Plan


@dataclass(frozen=True)
class MemoryUse:
    """One instruction of a GPU's stream and the bytes the GPU holds while it runs."""

    worker: int
    instr: Instr
    before: int       # the units present before it starts
    in_use: int       # while it runs: a call's peak plus the other units present
    after: int        # once it has finished: the units present

    @property
    def others(self) -> int:
        """A call's neighbours: what the GPU holds beside the call's own peak."""
        return self.in_use - self.instr.mem if self.instr.op == "run" and self.instr.mem else 0


def memory_uses(plan: Plan) -> Iterator[MemoryUse]:
    """Every GPU instruction in stream order with the memory its GPU holds (module doc)."""
    resident: dict[int, dict[str, int]] = {}
    for gpu, unit, nbytes in plan.resident:
        resident.setdefault(gpu, {})[unit] = max(nbytes, resident.get(gpu, {}).get(unit, 0))
    generates = {n.name for n in plan.graph.nodes if n.target == "generate"}

    def unit_of(i: Instr) -> str:   # a policy's generation keeps its own copy of the weights
        if i.node in generates:
            return f"{i.model}.generate"
        return plan.graph.weights_owner(i.model) if i.model else i.model   # shared base

    for s in plan.streams:
        if s.worker == HOST:
            continue
        full = dict(resident.get(s.worker, {}))
        # a GPU in offload mode keeps every model's state in host memory between calls
        offloaded = any(i.op == "offload" for i in s.instrs)
        present = {} if offloaded else dict(full)
        for i in s.instrs:
            before = sum(present.values())
            if i.op == "onload":
                present[unit_of(i)] = full.get(unit_of(i), 0)
            in_use = sum(present.values())
            if i.op == "run" and i.mem:
                in_use = i.mem + sum(b for u, b in present.items() if u != unit_of(i))
            if i.op == "offload":
                present.pop(unit_of(i), None)
            yield MemoryUse(s.worker, i, before, in_use, sum(present.values()))


def memory_timeline(plan: Plan) -> dict[int, list[tuple[float, int]]]:
    """GPU -> a step function [(time, bytes from then on)] over the predicted step, from 0
    to the step's end, at the times `simulate.schedule` gives the instructions."""
    from .simulate import happens_before, schedule

    group_of = happens_before(plan).group_of
    times = schedule(plan)
    step = max((t[1] for t in times.values()), default=0.0)
    out: dict[int, list[tuple[float, int]]] = {}
    for use in memory_uses(plan):
        start = times[group_of[use.instr.id]][0]
        end = start + use.instr.seconds
        points = out.setdefault(use.worker, [])
        if not points:
            points.append((0.0, use.before))
        points.append((start, use.in_use))
        points.append((end, use.after))
    for gpu, points in out.items():
        points.sort(key=lambda p: p[0])   # stable: at equal times, stream order
        merged: list[tuple[float, int]] = []
        for t, b in points:
            if merged and merged[-1][0] == t:
                merged[-1] = (t, b)
            elif not merged or merged[-1][1] != b:
                merged.append((t, b))
        if merged[-1][0] < step:
            merged.append((step, merged[-1][1]))
        out[gpu] = merged
    return out


__all__ = ["MemoryUse", "memory_uses", "memory_timeline"]
