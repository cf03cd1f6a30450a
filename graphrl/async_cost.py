"""Pricing asynchronous off-policy steps (`--staleness K`, passes/staleness.py).

With staleness K the generators run on a GPU pool of their own while the trainers train
on the rest, on rollouts generated up to K steps earlier (AReaL, Fu et al. 2025, arXiv
2505.24298, §4-5; verl's fully-async recipe). The search prices each split as the
executors run it (backends/stream_generation.py, priced by graphrl/stream_cost.py):
a step's generation runs a head (overlapping the training pool's calls) and, after the
train and the weight push, a tail that finishes the batch's long responses while the
next batch starts, so in steady state

    step = max(head, the rest of the step on the training pool) + weight push + tail

at the stream cut that makes it shortest, where

- the rest of the step is the synchronous search's own model (passes/search.py) on the
  training pool's nodes (`training_side`);
- head and tail are graphrl/serving.py's continuous-batching model streamed across
  steps (graphrl/stream_cost.py); generation with pipeline stages does not stream (the
  cost model's static batches): its head is the whole batch, its tail zero;
- the weight push sends the new weights from the training to the generation pool after
  every train: each generation GPU receives its tp x pp shard over the inter-node link
  (bf16), all GPUs in parallel (`push_seconds`).

Staleness: the executors run the same timeline for every K >= 1 — the generation pool
still waits for each step's weight push, a deeper rollout queue only delays when
training reads a batch — and only K = 1 lets the training pool start on a batch's
head-finished groups (graphrl/stream_train.py), so the fastest plan within a bound K is
always K = 1 (`STALENESS_NOTE`).

`async_candidates` tries every split into two node-aligned pools (one node: every split
of its GPUs) and returns them fastest first, with the reason each other split was
skipped; async pays only if the best beats the synchronous plan (`choose`).
`async_lower_bound` is what no split can beat under the same model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .cluster import ClusterSpec

STREAM_FLOOR = 1   # batches in flight at staleness 0 (no overlap)
MAX_STALENESS = 8  # the largest bound `--staleness K` takes
STALENESS_NOTE = ("in the executors every staleness >= 1 runs the same step (the "
                  "generation pool waits for each step's weight push; a deeper rollout "
                  "queue only delays training) and only 1 lets training start on a "
                  "batch's head-finished groups, so 1 is the fastest")
COARSE_SPLITS = 8  # splits priced first on large clusters; the best one's neighbours next


@dataclass(frozen=True)
class AsyncPlan:
    """One split of a cluster for an asynchronous step, priced as the executors run it
    (module doc): step = max(head, train) + push + tail."""

    staleness: int
    gen_gpus: int
    train_gpus: int
    gen_seconds: float     # one batch on the generation pool: head + tail
    push_seconds: float    # weights to the generators after each train
    train_seconds: float   # the rest of the step on the training pool
    gen_strategy: str
    head_seconds: float | None = None   # before the push; None: the whole batch (no stream)
    cut: int | None = None               # the stream cut, response tokens
    train_meshes: tuple[tuple[str, tuple[int, ...]], ...] = ()   # unit -> GPUs in its pool

    @property
    def head(self) -> float:
        return self.gen_seconds if self.head_seconds is None else self.head_seconds

    @property
    def tail(self) -> float:
        return self.gen_seconds - self.head

    @property
    def step_seconds(self) -> float:
        return max(self.head, self.train_seconds) + self.push_seconds + self.tail

    @property
    def pools(self) -> str:
        return f"{self.gen_gpus}+{self.train_gpus}"

    def text(self) -> str:
        stream = (f"head {self.head:.2f} s + push {self.push_seconds:.2f} s + tail "
                  f"{self.tail:.2f} s, cut at {self.cut} tokens" if self.cut is not None
                  else f"{self.gen_seconds:.2f} s whole batch + push "
                       f"{self.push_seconds:.2f} s")
        return (f"async staleness {self.staleness} on {self.pools} GPUs: generation "
                f"({self.gen_strategy}) {stream} | training pool {self.train_seconds:.2f} s "
                f"-> step {self.step_seconds:.2f} s")


def _gen_call(problem: Any) -> Any:
    gens = [c for c in problem.calls if c.phase == "generate"]
    if len(gens) != 1:
        return None
    return gens[0]


def streamed_generation(problem: Any, gen: Any, n: int, staleness: int
                        ) -> tuple[float, Any] | None:
    """(seconds per batch, strategy) of `gen` on n GPUs with K+1 batches in flight, over
    the strategies the synchronous search lets it use (fits a GPU); None if none fits.
    An ideal stream the executors do not run (they stream head and tail around the
    push, graphrl/stream_cost.py): only `async_lower_bound` uses it, as a floor."""
    from .serving import serve_generate

    if not problem.fits(gen.name, n):
        return None
    stream = max(STREAM_FLOOR, staleness + 1)
    spec = problem.specs[gen.model]
    best = None
    for s in _strategies(problem, gen, n):
        if problem.gen_engine == "hf" or s.pp > 1:   # static batches: nothing to overlap
            seconds = problem.cost(gen, s).seconds
        else:
            r = serve_generate(spec, gen.batch * stream, gen.seq, gen.new_tokens, s,
                               problem.cluster.gpu, problem.gen_engine,
                               lengths=problem.lengths, params=problem.params,
                               gpus_per_node=problem.cluster.gpus_per_node)
            seconds = r.seconds * gen.repeats / stream
        if best is None or seconds < best[0]:
            best = (seconds, s)
    return best


def _strategies(problem: Any, gen: Any, n: int) -> list[Any]:
    """The fastest few fitting strategies of the synchronous search (its choice first)."""
    from graphrl.passes.search import candidate_strategies

    first = problem.choice(gen.name, n).strategy
    others = [s for s in candidate_strategies(problem.specs[gen.model], "generate", n,
                                              gen.batch, problem.cluster.gpus_per_node,
                                              problem.uneven_dp)
              if s != first and problem.cost(gen, s).peak_bytes <= problem.capacity]
    others.sort(key=lambda s: problem.cost(gen, s).seconds)
    return [first] + others[:3]


def push_seconds(problem: Any, gen: Any, strategy: Any) -> float:
    """New weights to one generation GPU: its tp x pp shard in bf16 over the NIC."""
    spec = problem.specs[gen.model]
    c = problem.cluster
    link = c.bandwidth(0, c.gpus_per_node) if c.nodes > 1 else c.bandwidth(0, 1)
    return spec.weight_bytes / (strategy.tp * strategy.pp) / link


def training_side(problem: Any, gen: Any, gpus: int
                  ) -> tuple[float, tuple[tuple[str, tuple[int, ...]], ...]] | None:
    """(seconds, meshes) of every call but generation on `gpus` (whole nodes), placed by
    the synchronous search's colocate-all policy on those GPUs: the step of that side,
    and each unit's GPUs numbered from 0 within the pool (the lowered plan pins them
    there, `async_pins`); None if they do not fit."""
    from graphrl.passes.policies import run_policy
    from graphrl.passes.search import Infeasible, Problem

    c = problem.cluster
    sub = ClusterSpec(gpus // c.gpus_per_node, c.gpus_per_node, c.gpu) \
        if gpus >= c.gpus_per_node else ClusterSpec(1, gpus, c.gpu)
    packed = getattr(problem, "_packed", {})
    calls = [replace(x, deps=tuple(d for d in x.deps if d != gen.name),
                     seq=packed.get(x.name, x.seq))
             for x in problem.calls if x.name != gen.name]
    sub_problem = Problem(calls, problem.specs, sub, problem.gen_engine, problem.params,
                          {}, None, problem.headroom, problem.engines, problem.efficiency)
    try:
        ev = run_policy(sub_problem, "colocate-all")
    except Infeasible:
        return None
    return ev.step_seconds, tuple((u, tuple(m.gpus)) for u, m in ev.assignment)


def pool_splits(cluster: ClusterSpec) -> list[int]:
    """Generation pool sizes: whole nodes, leaving at least one node to train (one node:
    every split of its GPUs)."""
    g = cluster.gpus_per_node
    if cluster.nodes == 1:
        return list(range(1, g))
    return [k * g for k in range(1, cluster.nodes)]


def split_plan(problem: Any, gen: Any, a: int) -> AsyncPlan | str:
    """Generation on the first `a` GPUs, everything else on the rest, priced as the
    executors run it (module doc) with the fastest of the generation strategies the
    synchronous search lets it use and the best stream cut; or why the split cannot run."""
    from .stream_cost import best_stream

    n = problem.cluster.num_gpus
    if not problem.fits(gen.name, a):
        return f"{gen.call} does not fit on {a} GPU(s)"
    side = training_side(problem, gen, n - a)
    if side is None:
        return f"the training side does not fit on {n - a} GPU(s)"
    train, meshes = side
    size = dict((u, len(g)) for u, g in meshes)
    for c in problem.calls:   # pinned, a pool is a mesh inside the cluster, not all of it
        if c.phase in ("forward", "train") and c.unit in size \
                and not problem.fits(c.name, size[c.unit]):
            return (f"{c.call} fits the {n - a}-GPU training pool only as a whole cluster "
                    f"of its own (uneven data parallelism), not as {size[c.unit]} GPUs pinned "
                    "inside this one")
    best: AsyncPlan | None = None
    for s in _strategies(problem, gen, a)[:2]:
        push = push_seconds(problem, gen, s)
        choice = best_stream(problem, gen, s, train, push)
        if choice is None:   # pipeline stages: static batches, no stream
            plan = AsyncPlan(1, a, n - a, problem.cost(gen, s).seconds, push, train, s.text(),
                             train_meshes=meshes)
        else:
            plan = AsyncPlan(1, a, n - a, choice.phases.total, push, train, s.text(),
                             choice.phases.head, choice.cut, meshes)
        if best is None or plan.step_seconds < best.step_seconds:
            best = plan
    return best if best is not None else f"{gen.call} has no strategy on {a} GPU(s)"


def pinned_pools(problem: Any) -> Any:
    """The problem as a compile with an async plan's pins sees it: pools that are not a
    power of two admit uneven data-parallel splits (passes/search.py Problem.uneven_dp),
    which the synchronous search of a power-of-two cluster leaves out."""
    from graphrl.passes.search import Problem

    if problem.uneven_dp:
        return problem
    twin = Problem(problem.calls, problem.specs, problem.cluster, problem.gen_engine,
                   problem.params, problem.pins, problem.lengths, problem.headroom,
                   problem.engines, problem.efficiency)
    twin.uneven_dp = True
    return twin


def async_candidates(problem: Any, staleness: int
                     ) -> tuple[list[AsyncPlan], list[tuple[str, str]]]:
    """(plans, skipped): one priced plan per split that can run, fastest first, and
    (pools, why) for each split that cannot. On clusters with more than COARSE_SPLITS
    splits, every k-th split is priced first, then the splits around the fastest. All
    plans are staleness 1 (STALENESS_NOTE); none if staleness < 1 or the step has not
    exactly one generate call."""
    gen = _gen_call(problem)
    if gen is None or staleness < 1:
        return [], []
    n = problem.cluster.num_gpus
    problem = pinned_pools(problem)
    skipped = [(f"{a}+{n - a}", f"{gen.call} does not fit on {a} GPU(s)")
               for a in pool_splits(problem.cluster) if not problem.fits(gen.name, a)]
    splits = [a for a in pool_splits(problem.cluster) if problem.fits(gen.name, a)]
    step = max(1, -(-len(splits) // COARSE_SPLITS))
    priced: dict[int, AsyncPlan | str] = {}

    def price(i: int) -> None:
        if 0 <= i < len(splits) and splits[i] not in priced:
            priced[splits[i]] = split_plan(problem, gen, splits[i])

    def ranked() -> list[AsyncPlan]:
        return sorted((x for x in priced.values() if isinstance(x, AsyncPlan)),
                      key=lambda x: x.step_seconds)

    for i in list(range(0, len(splits), step)) + [len(splits) - 1]:
        price(i)
    if ranked() and step > 1:
        at = splits.index(ranked()[0].gen_gpus)
        for i in range(at - step + 1, at + step):
            price(i)
    skipped += [(f"{a}+{n - a}", why) for a, why in priced.items() if isinstance(why, str)]
    skipped.sort(key=lambda x: int(x[0].split("+")[0]))
    return ranked(), skipped


def best_async(problem: Any, staleness: int) -> AsyncPlan | None:
    """The fastest split of the cluster into a generation and a training pool (module
    doc); None if the step has not exactly one generate call or no split fits."""
    plans, _ = async_candidates(problem, staleness)
    return plans[0] if plans else None


def async_lower_bound(problem: Any, staleness: int) -> float | None:
    """Seconds no asynchronous split can beat under this model: for the best split, the
    larger of streamed generation at its fastest on the generation pool (ideal or
    executed stream, `_generation_floor`) and the fastest
    train call alone on the training pool (forwards, ops and the push count zero); and
    never less than the least GPU-seconds of streamed generation plus training spread
    over the whole cluster."""
    from graphrl.passes.policies import mesh_sizes

    gen = _gen_call(problem)
    if gen is None or staleness < 1:
        return None
    n = problem.cluster.num_gpus
    trains = [c for c in problem.calls if c.phase == "train"]
    sizes = mesh_sizes(problem)
    gen_at = {m: _generation_floor(problem, gen, m, staleness) for m in sizes if m < n}
    train_at = {m: sum(problem.choice(t.name, m).seconds for t in trains)
                for m in sizes if m < n and all(problem.fits(t.name, m) for t in trains)}
    split = math.inf
    for a in pool_splits(problem.cluster):
        g = min((v[0] for m, v in gen_at.items() if v is not None and m <= a),
                default=math.inf)
        t = min((v for m, v in train_at.items() if m <= n - a), default=math.inf)
        split = min(split, max(g, t))
    work = (min((m * v[0] for m, v in gen_at.items() if v is not None), default=math.inf)
            + min((m * v for m, v in train_at.items()), default=math.inf)) / n
    bound = max(split, work)
    return bound if math.isfinite(bound) else None


def _generation_floor(problem: Any, gen: Any, n: int, staleness: int
                      ) -> tuple[float, Any] | None:
    """The least seconds per batch of generation on n GPUs under either streamed model:
    the ideal K+1-batch stream (streamed_generation) or the executors' head/tail stream
    at any cut (graphrl/stream_cost.py: a step's generation pool works head + tail). The
    executed stream never drains between batches (each tail overlaps the next batch's
    head), so with long tails it can beat the ideal stream's drained bursts; a bound must
    cover both."""
    from .stream_cost import CUTS, stream_phases

    ideal = streamed_generation(problem, gen, n, staleness)
    if ideal is None:
        return None
    totals = [ph.total for f in CUTS
              if (ph := stream_phases(problem, gen, ideal[1],
                                      max(1, int(round(gen.new_tokens * f))))) is not None]
    return (min([ideal[0]] + totals), ideal[1])


def choose(sync_seconds: float, plan: AsyncPlan | None) -> int:
    """The staleness to run: the plan's if async beats the synchronous step, else 0."""
    if plan is not None and plan.step_seconds < sync_seconds:
        return plan.staleness
    return 0


__all__ = ["AsyncPlan", "MAX_STALENESS", "STALENESS_NOTE", "async_candidates",
           "async_lower_bound", "async_pins", "best_async", "choose", "pool_splits",
           "push_seconds", "split_plan", "streamed_generation", "training_side"]


def async_pins(graph: Any, plan: AsyncPlan) -> dict[str, dict[str, Any]]:
    """Placement entries (graphrl.placement_file's form) putting generation on the first
    `gen_gpus` GPUs and every other call on the GPUs the training side was priced on
    (`train_meshes`, after the generation pool; the whole rest where it has none)."""
    from graphrl.passes.assign_devices import unit_of

    from .parallel import DeviceMesh

    def text(gpus: Any) -> str:
        return DeviceMesh(tuple(gpus)).text()
    meshes = {u: [plan.gen_gpus + g for g in gpus] for u, gpus in plan.train_meshes}
    rest = range(plan.gen_gpus, plan.gen_gpus + plan.train_gpus)
    return {n.call: {"gpus": text(range(plan.gen_gpus)) if n.target == "generate"
                     else text(meshes.get(unit_of(n), rest))}
            for n in graph.calls()}
