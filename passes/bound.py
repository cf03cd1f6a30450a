"""A lower bound on the step time of any placement of a problem (search.py's model).

No placement of a synchronous RL step can be faster than

    generation  +  training

where *generation* is the fastest any generate call can run on any mesh the cluster offers
(every later call needs its rollouts: forwards may start on a first streamed micro-batch,
but training needs advantages of the whole batch), and *training* is the fastest the train
calls can run together after it: one alone at its best mesh size; two either one after the
other (each at its best) or side by side on disjoint meshes that share the cluster; more
than two no faster than their least total GPU-seconds spread over the whole cluster.
Forward passes over the rollouts that every training needs (reference log-probs, rewards,
values) must also finish between the two: while the one generate call runs on k GPUs they
can use at most the other N - k, i.e. (N - k) * gen(k) GPU-seconds, and what is left of
their least GPU-seconds W takes at least (W - (N - k) * gen(k)) / N once it ends. As
gen(k) + max(0, W - (N - k) * gen(k)) / N grows with gen(k), pricing every mesh size k at
its fastest generation and taking the least over k keeps the bound valid, streaming
included (a streamed forward still runs on GPUs the generator does not use).
Resharding and offloading count as zero, and each call is costed alone (its fastest
strategy, memory aside from fitting), so the bound is optimistic everywhere: a placement
policy's speedup over another can never exceed that one's step over the bound.
benchmarks/plan_quality.py reports it per case; tests/test_search.py checks it against
brute force.
"""
from __future__ import annotations

import math

from .policies import mesh_sizes
from .search import CallInfo, Problem


def _fastest(problem: Problem, c: CallInfo, at_most: int) -> float:
    return min((problem.choice(c.name, n).seconds for n in mesh_sizes(problem)
                if n <= at_most and problem.fits(c.name, n)), default=math.inf)


def _gpu_seconds(problem: Problem, c: CallInfo) -> float:
    return min((n * problem.choice(c.name, n).seconds for n in mesh_sizes(problem)
                if problem.fits(c.name, n)), default=math.inf)


def _depends_on(problem: Problem, call: CallInfo, target: str) -> bool:
    seen, todo = set(), list(call.deps)
    while todo:
        d = todo.pop()
        if d == target:
            return True
        if d not in seen:
            seen.add(d)
            todo.extend(problem.by_name[d].deps)
    return False


def _generation_with_forwards(problem: Problem, gen: CallInfo,
                              trains: list[CallInfo]) -> float:
    """Least time until the generate call and the forwards every train needs are done
    (module doc): min over mesh sizes k of gen(k) + max(0, W - (N - k) gen(k)) / N."""
    n = problem.cluster.num_gpus
    needed = [c for c in problem.calls if c.phase == "forward" and trains
              and _depends_on(problem, c, gen.name)
              and all(_depends_on(problem, t, c.name) for t in trains)]
    work = sum(_gpu_seconds(problem, c) for c in needed)
    if math.isinf(work):
        return math.inf
    best = math.inf
    for k in mesh_sizes(problem):
        if k > n or not problem.fits(gen.name, k):
            continue
        g = problem.choice(gen.name, k).seconds
        best = min(best, g + max(0.0, work - (n - k) * g) / n)
    return best


def step_lower_bound(problem: Problem) -> float | None:
    """Seconds no placement's step can beat (see module doc); None when the step has no
    generate call, or a train call that does not need every rollout."""
    n = problem.cluster.num_gpus
    gens = [c for c in problem.calls if c.phase == "generate"]
    trains = [c for c in problem.calls if c.phase == "train"]
    if not gens or not all(_depends_on(problem, t, g.name) for t in trains for g in gens):
        return None
    generation = max(_fastest(problem, g, n) for g in gens)
    if len(gens) == 1:
        with_forwards = _generation_with_forwards(problem, gens[0], trains)
        if not math.isinf(with_forwards):
            generation = max(generation, with_forwards)
    if not trains:
        training = 0.0
    elif len(trains) == 1:
        training = _fastest(problem, trains[0], n)
    elif len(trains) == 2:
        a, b = trains
        serial = _fastest(problem, a, n) + _fastest(problem, b, n)
        side_by_side = min((max(_fastest(problem, a, k), _fastest(problem, b, n - k))
                            for k in mesh_sizes(problem) if k < n), default=math.inf)
        training = min(serial, side_by_side)
    else:
        training = max(max(_fastest(problem, t, n) for t in trains),
                       sum(_gpu_seconds(problem, t) for t in trains) / n)
    total = generation + training
    return None if math.isinf(total) else total
