"""Placement policies: which GPUs each unit (see search.py) gets.

- colocate-all: every unit on all GPUs, run one after another (DeepSpeed-Chat, verl).
- split: every unit on its own GPU pool, generation apart from training (OpenRLHF).
- hybridflow: HybridFlow's Algorithm 1 (Sheng et al., EuroSys'25, §6): enumerate the
  colocation plans of the models (set partitions; the actor's generation stays with its
  training), allocate GPUs to each colocated set, search each model's strategy,
  simulate, keep the fastest.
- auto: the same enumeration over *units* (so generation may also leave its model's
  GPUs), with micro-batch streaming, seeded with every other policy's answer so it is
  never worse than any of them.

All share one allocation search and the per-call strategy search of `Problem`, so a
comparison measures placement, never a handicapped baseline.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator, Sequence

from graphrl.parallel import DeviceMesh

from .search import Evaluation, Infeasible, Problem

EXHAUSTIVE_LIMIT = 1100   # allocations of one partition enumerated exhaustively up to this
STREAMS = (1, 2, 4, 8)


def set_partitions(items: Sequence[str]) -> Iterator[list[list[str]]]:
    """All partitions of items into non-empty blocks (Bell-number many), deterministic."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def mesh_sizes(problem: Problem) -> list[int]:
    """Sizes a mesh may have: any count inside one node, whole nodes beyond."""
    c = problem.cluster
    sizes = list(range(1, c.gpus_per_node + 1))
    sizes += [k * c.gpus_per_node for k in range(2, c.nodes + 1)]
    return sizes


def layout(sizes: Sequence[int], gpus_per_node: int, total: int) -> list[DeviceMesh] | None:
    """Node-aligned meshes for these sizes: multi-node groups take whole nodes first, then
    sub-node groups are packed first-fit-decreasing into the remaining nodes (a mesh never
    straddles a node). None if they do not fit."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    meshes: list[DeviceMesh | None] = [None] * len(sizes)
    node = 0
    nodes = total // gpus_per_node
    spans: list[list[int]] = []  # [next free GPU, end] of partly used nodes
    for i in order:
        s = sizes[i]
        if s >= gpus_per_node:
            if s % gpus_per_node or node + s // gpus_per_node > nodes:
                return None
            meshes[i] = DeviceMesh.range(node * gpus_per_node, s)
            node += s // gpus_per_node
            continue
        for span in spans:
            if span[1] - span[0] >= s:
                meshes[i] = DeviceMesh.range(span[0], s)
                span[0] += s
                break
        else:
            if node >= nodes:
                return None
            spans.append([node * gpus_per_node + s, (node + 1) * gpus_per_node])
            meshes[i] = DeviceMesh.range(node * gpus_per_node, s)
            node += 1
    return meshes  # type: ignore[return-value]


def _assignment(blocks: list[list[str]], meshes: list[DeviceMesh]) -> dict[str, DeviceMesh]:
    return {u: m for block, m in zip(blocks, meshes) for u in block}


def best_allocation(problem: Problem, blocks: list[list[str]], streams: Sequence[int] = (1,),
                    ) -> Evaluation | None:
    """The fastest GPU allocation for these colocated blocks (each block on one mesh,
    blocks on disjoint meshes): exhaustive when small, else coordinate descent."""
    c = problem.cluster
    sizes = mesh_sizes(problem)
    k = len(blocks)
    if k > c.num_gpus:
        return None
    gens = set(gen_units(problem))
    gen_alone = any(set(b) & gens and not set(b) - gens for b in blocks)
    tried_streams = streams if gen_alone else (1,)

    def score(alloc: tuple[int, ...]) -> Evaluation | None:
        if sum(alloc) > c.num_gpus:
            return None
        meshes = layout(alloc, c.gpus_per_node, c.num_gpus)
        if meshes is None:
            return None
        assignment = _assignment(blocks, meshes)
        return _fastest(problem.try_evaluate(assignment, st) for st in tried_streams)

    if len(sizes) ** k <= EXHAUSTIVE_LIMIT:
        return _fastest(score(a) for a in itertools.product(sizes, repeat=k))
    return _descend(score, sizes, _starts(problem, blocks, sizes))


def _fastest(results: Iterable[Evaluation | None]) -> Evaluation | None:
    best = None
    for ev in results:
        if ev is not None and (best is None or ev.step_seconds < best.step_seconds - 1e-12):
            best = ev
    return best


def _snap(sizes: list[int], want: float) -> int:
    return min(sizes, key=lambda s: (abs(s - want), s))


def _starts(problem: Problem, blocks: list[list[str]], sizes: list[int]) -> list[tuple[int, ...]]:
    """Balanced and work-proportional allocations to start the descent from. A block's
    work is its calls' GPU-seconds on the whole cluster."""
    n, k = problem.cluster.num_gpus, len(blocks)
    work = []
    for b in blocks:
        w = 0.0
        for call in problem.calls:
            if call.unit in b and problem.fits(call.name, n):
                w += problem.choice(call.name, n).seconds * n
        work.append(max(w, 1e-9))
    total = sum(work)
    starts = {tuple(_snap(sizes, n / k) for _ in blocks),
              tuple(_snap(sizes, n * w / total) for w in work)}
    for i in range(k):  # one block on half the cluster, the rest share the other half
        starts.add(tuple(_snap(sizes, n / 2 if j == i else n / 2 / max(1, k - 1))
                         for j in range(k)))
    return sorted(starts)


def _descend(score: Callable[[tuple[int, ...]], Evaluation | None], sizes: list[int],
             starts: list[tuple[int, ...]]) -> Evaluation | None:
    """Coordinate descent over allocations: move one size step up or down for one block,
    or between two blocks, while that shortens the step."""
    index = {s: i for i, s in enumerate(sizes)}
    best: Evaluation | None = None
    for start in starts:
        cur, cur_ev = start, score(start)
        if cur_ev is None:
            continue
        improved = True
        while improved:
            improved = False
            k = len(cur)
            moves = [(i, d, None, 0) for i in range(k) for d in (1, -1)]
            moves += [(i, 1, j, -1) for i in range(k) for j in range(k) if i != j]
            for i, di, j, dj in moves:
                cand = list(cur)
                a = index[cur[i]] + di
                if not 0 <= a < len(sizes):
                    continue
                cand[i] = sizes[a]
                if j is not None:
                    b = index[cur[j]] + dj
                    if not 0 <= b < len(sizes):
                        continue
                    cand[j] = sizes[b]
                ev = score(tuple(cand))
                if ev is not None and ev.step_seconds < cur_ev.step_seconds - 1e-12:
                    cur, cur_ev, improved = tuple(cand), ev, True
        if best is None or cur_ev.step_seconds < best.step_seconds:
            best = cur_ev
    return best


# -- the policies -------------------------------------------------------------------------
def gen_units(problem: Problem) -> dict[str, str]:
    """Generation unit -> the unit of its model's other calls."""
    out = {}
    for c in problem.calls:
        if c.phase == "generate" and c.model in problem.units:
            out[c.unit] = c.model
    return out


def colocate_all(problem: Problem) -> Evaluation | None:
    mesh = DeviceMesh.range(0, problem.cluster.num_gpus)
    return problem.try_evaluate({u: mesh for u in problem.units})


def split(problem: Problem) -> Evaluation | None:
    return best_allocation(problem, [[u] for u in problem.units])


def _model_partitions(problem: Problem) -> Iterator[list[list[str]]]:
    """Partitions of the models, each generation unit kept with its model (HybridFlow)."""
    gens = gen_units(problem)
    models = [u for u in problem.units if u not in gens]
    for part in set_partitions(models):
        yield [block + [g for g, m in gens.items() if m in block] for block in part]


def hybridflow(problem: Problem) -> Evaluation | None:
    return _fastest(best_allocation(problem, blocks) for blocks in _model_partitions(problem))


def auto(problem: Problem) -> Evaluation | None:
    """auto's answer by the search's estimate (see auto_finalists)."""
    finalists = auto_finalists(problem)
    return finalists[0] if finalists else None


def auto_finalists(problem: Problem) -> list[Evaluation]:
    """auto's answer first, then the other policies' answers (distinct ones only).

    auto's answer is the best of: every partition of the units onto disjoint meshes, the
    other policies' answers, then a local search that moves one unit at a time onto any
    mesh (nested meshes included: e.g. reference and reward side by side on the two
    halves of the policy's GPUs) while that shortens the step. The compiler lowers every
    finalist and keeps the fastest plan, so that auto is never worse than a baseline by
    the plan's own simulated time either (assign_devices.py)."""
    found = [best_allocation(problem, blocks, STREAMS)
             for blocks in set_partitions(problem.units)]
    baselines = [colocate_all(problem), split(problem), hybridflow(problem)]
    seeds = sorted((ev for ev in found + baselines if ev is not None),
                   key=lambda ev: ev.step_seconds)
    if not seeds:
        return []
    meshes = all_meshes(problem) if problem.cluster.num_gpus <= 16 else buddy_meshes(problem)
    refined = []
    for i, ev in enumerate(seeds[:REFINE_SEEDS]):
        if i >= MIN_REFINE_SEEDS and problem.evaluations > REFINE_BUDGET:
            break
        refined.append(refine(problem, ev, meshes))
    out: list[Evaluation] = []
    for ev in [_fastest(iter(refined + seeds[:1])), *baselines]:
        if ev is not None and all((ev.assignment, ev.stream) != (o.assignment, o.stream)
                                  for o in out):
            out.append(ev)
    return out


# The local search starts from the best seeds: at least MIN_REFINE_SEEDS of them, and up
# to REFINE_SEEDS while fewer than REFINE_BUDGET placements have been evaluated (a count,
# not a clock, so that compiling stays deterministic). Small clusters refine all eight
# (auto then equals brute force on the enumerable cases); 256 GPUs stay under 2 s.
MIN_REFINE_SEEDS = 2
REFINE_SEEDS = 8
REFINE_BUDGET = 4000


def all_meshes(problem: Problem) -> list[DeviceMesh]:
    """Every node-aligned mesh: inside one node any size at any offset on a single-node
    cluster, aligned to its size on larger ones; whole nodes beyond."""
    c = problem.cluster
    out = []
    for size in mesh_sizes(problem):
        if size >= c.gpus_per_node:
            step = c.gpus_per_node
        else:
            step = 1 if c.nodes == 1 else size
        for start in range(0, c.num_gpus - size + 1, step):
            if size < c.gpus_per_node and start // c.gpus_per_node != (start + size - 1) // c.gpus_per_node:
                continue
            out.append(DeviceMesh.range(start, size))
    return out


def valid_mesh(problem: Problem, start: int, size: int) -> bool:
    g = problem.cluster.gpus_per_node
    if size >= g:
        return size % g == 0 and start % g == 0
    return start // g == (start + size - 1) // g


def splits(problem: Problem, mesh: DeviceMesh) -> Iterator[tuple[DeviceMesh, DeviceMesh]]:
    """Ways to cut a contiguous mesh into two node-aligned contiguous halves."""
    start, m = mesh.gpus[0], mesh.size
    if mesh.gpus != tuple(range(start, start + m)):
        return
    cuts = range(1, m) if m <= problem.cluster.gpus_per_node else sorted(
        {m // 4, m // 2, m - m // 4} - {0, m})  # multi-node meshes: quarter points
    for a in cuts:
        if valid_mesh(problem, start, a) and valid_mesh(problem, start + a, m - a):
            yield DeviceMesh.range(start, a), DeviceMesh.range(start + a, m - a)


def _moves(problem: Problem, assign: dict[str, DeviceMesh],
           meshes: list[DeviceMesh]) -> Iterator[dict[str, DeviceMesh]]:
    """One unit onto another mesh; or the units sharing a mesh each stay or move to one
    of its two halves (nested placement: side by side inside the larger mesh)."""
    for unit in problem.units:
        for mesh in meshes:
            if mesh != assign[unit]:
                yield {**assign, unit: mesh}
    by_mesh: dict[DeviceMesh, list[str]] = {}
    for u, m in assign.items():
        by_mesh.setdefault(m, []).append(u)
    for mesh, units in by_mesh.items():
        if len(units) < 2:
            continue
        halves = list(splits(problem, mesh))
        for choice in itertools.product((0, 1, 2), repeat=len(units)):
            if 1 not in choice or 2 not in choice:
                continue  # something must move to each half
            for a, b in halves:
                where = (mesh, a, b)
                yield {**assign, **{u: where[c] for u, c in zip(units, choice)}}


def buddy_meshes(problem: Problem) -> list[DeviceMesh]:
    """Large clusters: whole-node meshes of 1, 2, 4, ... nodes at offsets aligned to their
    size (sub-node and odd shapes are still reached by the split moves of refine)."""
    c = problem.cluster
    out, nodes = [], 1
    while nodes <= c.nodes:
        size = nodes * c.gpus_per_node
        out += [DeviceMesh.range(start, size) for start in range(0, c.num_gpus - size + 1, size)]
        nodes *= 2
    if c.nodes & (c.nodes - 1):
        out.append(DeviceMesh.range(0, c.num_gpus))
    return out


def _streams(problem: Problem, assign: dict[str, DeviceMesh]) -> Sequence[int]:
    """Streaming matters only when a generation mesh is apart from another unit's."""
    for g in gen_units(problem):
        if any(not assign[g].overlaps(m) for u, m in assign.items() if u != g):
            return STREAMS
    return (1,)


def refine(problem: Problem, ev: Evaluation, meshes: list[DeviceMesh]) -> Evaluation:
    """Best-improvement local search over (unit -> mesh, streaming factor) with the moves
    of _moves, until no move shortens the step."""
    best = ev
    while True:
        trials = (problem.try_evaluate(trial, st)
                  for trial in _moves(problem, dict(best.assignment), meshes)
                  for st in _streams(problem, trial))
        cand = _fastest(trials)
        if cand is None or cand.step_seconds >= best.step_seconds - 1e-12:
            return best
        best = cand


def brute_force(problem: Problem) -> Evaluation | None:
    """Every unit on every node-aligned mesh at every offset, every streaming factor:
    for small clusters only (tests compare auto against it)."""
    meshes = all_meshes(problem)
    results = (problem.try_evaluate(dict(zip(problem.units, combo)), st)
               for combo in itertools.product(meshes, repeat=len(problem.units))
               for st in STREAMS)
    return _fastest(results)


POLICIES: dict[str, Callable[[Problem], Evaluation | None]] = {
    "colocate-all": colocate_all, "split": split, "hybridflow": hybridflow, "auto": auto}


def run_policy(problem: Problem, policy: str) -> Evaluation:
    """The policy's best evaluation; Infeasible (naming the hardest call) if none fits."""
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r} (known: {', '.join(POLICIES)})")
    ev = POLICIES[policy](problem)
    if ev is None:
        raise hardest_call(problem)
    return ev


def hardest_call(problem: Problem) -> Infeasible:
    """The call that fits on no mesh of the cluster, reported at the mesh size where it
    comes closest (a cluster's GPU count itself may admit no strategy, e.g. 6 GPUs for a
    batch of 128: then a smaller mesh says what is missing); the one needing most."""
    n = problem.cluster.num_gpus
    worst: Infeasible | None = None
    for c in problem.calls:
        if c.phase == "op":
            continue
        tries = [problem._choice(c.name, size) for size in mesh_sizes(problem)]
        if not all(isinstance(t, Infeasible) for t in tries):
            continue
        ch = min((t for t in tries if t.need), key=lambda t: t.need,
                 default=problem._choice(c.name, n))
        if worst is None or ch.need > worst.need:
            worst = ch
    if worst is None and problem.host_failure is not None:   # host RAM, not GPU memory
        worst = problem.host_failure
    if worst is None:  # each call fits alone, but the policy's pools were too small
        worst = Infeasible("the step", n, 0, problem.capacity)
    return worst


def smallest_cluster(problem: Problem, policy: str, max_nodes: int = 1024) -> int | None:
    """Fewest nodes (same node shape) on which the policy finds a placement."""
    from dataclasses import replace

    from .search import replace_cluster

    nodes = problem.cluster.nodes
    while nodes <= max_nodes:
        nodes *= 2
        bigger = replace_cluster(problem, replace(problem.cluster, nodes=nodes))
        if colocate_all(bigger) is not None or (policy != "colocate-all"
                                                and POLICIES[policy](bigger) is not None):
            return nodes
    return None


__all__ = ["POLICIES", "run_policy", "brute_force", "set_partitions", "layout", "mesh_sizes",
           "best_allocation", "smallest_cluster", "hardest_call"]
