"""Predicted timeline of a Plan, from its happens-before graph and the cost model's
durations.

Happens-before: each stream runs in order; an instruction waits for its `deps`; a gang
(every GPU running one node, or one reshard) starts together; a send and its recv start
together (a rendezvous). Gangs and rendezvous pairs are merged into one group, so the
plan is deadlock-free exactly when the group graph is acyclic.
"""
from __future__ import annotations

from dataclasses import dataclass

from .plan import HOST, Instr, Plan, worker_name
from .timeline import Event


@dataclass(frozen=True)
class HappensBefore:
    groups: dict[str, list[tuple[int, Instr]]]   # group key -> members
    group_of: dict[str, str]                      # instr id -> group key
    edges: dict[str, set[str]]                    # group -> groups that must finish first


def pair_key(worker: int, i: Instr) -> str | None:
    """The rendezvous key of a send or recv: both ends compute the same key."""
    if i.op == "send":
        return f"xfer:{i.value}:{worker}->{i.peer}"
    if i.op == "recv":
        return f"xfer:{i.value}:{i.peer}->{worker}"
    return None


def happens_before(plan: Plan) -> HappensBefore:
    groups: dict[str, list[tuple[int, Instr]]] = {}
    group_of: dict[str, str] = {}
    for w, i in plan.instrs():
        key = pair_key(w, i) or i.gang
        groups.setdefault(key, []).append((w, i))
        group_of[i.id] = key
    edges: dict[str, set[str]] = {k: set() for k in groups}
    for s in plan.streams:
        for prev, cur in zip(s.instrs, s.instrs[1:]):
            a, b = group_of[prev.id], group_of[cur.id]
            if a != b:
                edges[b].add(a)
    for _, i in plan.instrs():
        for d in i.deps:
            if d in group_of and group_of[d] != group_of[i.id]:
                edges[group_of[i.id]].add(group_of[d])
    return HappensBefore(groups, group_of, edges)


def find_deadlock(hb: HappensBefore) -> list[str] | None:
    """A cycle of groups waiting on each other, or None."""
    state: dict[str, int] = {}
    for root in hb.groups:
        if state.get(root):
            continue
        stack = [(root, iter(sorted(hb.edges[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(hb.edges[nxt]))))
                path.append(nxt)
    return None


def schedule(plan: Plan) -> dict[str, tuple[float, float]]:
    """Group key -> (start, end) seconds. Raises ValueError on a deadlock."""
    hb = happens_before(plan)
    cycle = find_deadlock(hb)
    if cycle:
        raise ValueError("deadlock: " + " -> ".join(cycle))
    times: dict[str, tuple[float, float]] = {}
    remaining = {k: set(v) for k, v in hb.edges.items()}
    users: dict[str, list[str]] = {k: [] for k in hb.groups}
    for k, deps in hb.edges.items():
        for d in deps:
            users[d].append(k)
    ready = sorted(k for k, v in remaining.items() if not v)
    while ready:
        k = ready.pop(0)
        start = max((times[d][1] for d in hb.edges[k]), default=0.0)
        times[k] = (start, start + max(i.seconds for _, i in hb.groups[k]))
        for u in users[k]:
            remaining[u].discard(k)
            if not remaining[u]:
                ready.append(u)
    return times


def simulate(plan: Plan) -> tuple[list[Event], float]:
    """Predicted events (one per instruction that takes time) and the step time."""
    hb = happens_before(plan)
    times = schedule(plan)
    events = []
    for w, i in plan.instrs():
        start, end = times[hb.group_of[i.id]]
        if i.op == "free" or (end - start) <= 0 and i.op != "run":
            continue
        events.append(Event(i.node or i.value, i.label or i.op, i.model,
                            "host" if w == HOST else f"gpu{w}", start,
                            start + i.seconds, 0, i.nbytes))
    step = max((t[1] for t in times.values()), default=0.0)
    return events, step


__all__ = ["HappensBefore", "happens_before", "find_deadlock", "schedule", "simulate",
           "pair_key", "worker_name"]
