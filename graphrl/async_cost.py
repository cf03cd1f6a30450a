"""Pricing asynchronous off-policy steps (`--staleness K`, passes/staleness.py).

With staleness K the generators run on a GPU pool of their own while the trainers train
on the rest, on rollouts generated up to K steps earlier (AReaL, Fu et al. 2025, arXiv
2505.24298, §4-5; verl's fully-async recipe). In steady state one step costs

    max(weight push + generation of one batch on the generation pool,
        the rest of the step (forwards, ops, trains) on the training pool)

- the rest of the step is the synchronous search's own model (passes/search.py) on the
  training pool's nodes, with forward/train sequences packed at the mean response length
  as the synchronous pricing does;
- generation is graphrl/serving.py's continuous-batching engine fed a stream of K+1
  batches (a staleness bound of K lets the generators admit the next K batches' prompts
  while the current batch's longest responses finish, so a batch's long tail overlaps
  the next batch's body instead of idling the engine; AReaL §2 and §5.1 identify this
  idle tail as what synchronous systems lose); a batch costs 1/(K+1) of the stream;
- the weight push sends the new weights from the training to the generation pool after
  every train: each generation GPU receives its tp x pp shard over the inter-node link
  (bf16), all GPUs in parallel; it is not overlapped with generation here (AReaL
  interrupts generation for it).

The planner tries every split into two node-aligned pools and keeps the fastest; async
pays only if that beats the synchronous plan (`choose`). `async_lower_bound` is what no
split can beat under the same model (module doc of `async_lower_bound`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .cluster import ClusterSpec

STREAM_FLOOR = 1   # batches in flight at staleness 0 (no overlap)


@dataclass(frozen=True)
class AsyncPlan:
    """The best asynchronous split of a cluster for one step."""

    staleness: int
    gen_gpus: int
    train_gpus: int
    gen_seconds: float     # one batch on the generation pool (streamed)
    push_seconds: float    # weights to the generators after each train
    train_seconds: float   # the rest of the step on the training pool
    gen_strategy: str

    @property
    def step_seconds(self) -> float:
        return max(self.gen_seconds + self.push_seconds, self.train_seconds)

    def text(self) -> str:
        return (f"async staleness {self.staleness}: generation on {self.gen_gpus} GPUs "
                f"({self.gen_strategy}) {self.gen_seconds:.2f} s + push "
                f"{self.push_seconds:.2f} s | training on {self.train_gpus} GPUs "
                f"{self.train_seconds:.2f} s -> step {self.step_seconds:.2f} s")


def _gen_call(problem: Any) -> Any:
    gens = [c for c in problem.calls if c.phase == "generate"]
    if len(gens) != 1:
        return None
    return gens[0]


def streamed_generation(problem: Any, gen: Any, n: int, staleness: int
                        ) -> tuple[float, Any] | None:
    """(seconds per batch, strategy) of `gen` on n GPUs with K+1 batches in flight, over
    the strategies the synchronous search lets it use (fits a GPU); None if none fits."""
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
                                              gen.batch, problem.cluster.gpus_per_node)
              if s != first and problem.cost(gen, s).peak_bytes <= problem.capacity]
    others.sort(key=lambda s: problem.cost(gen, s).seconds)
    return [first] + others[:3]


def push_seconds(problem: Any, gen: Any, strategy: Any) -> float:
    """New weights to one generation GPU: its tp x pp shard in bf16 over the NIC."""
    spec = problem.specs[gen.model]
    c = problem.cluster
    link = c.bandwidth(0, c.gpus_per_node) if c.nodes > 1 else c.bandwidth(0, 1)
    return spec.weight_bytes / (strategy.tp * strategy.pp) / link


def training_side(problem: Any, gen: Any, gpus: int) -> float | None:
    """Seconds of every call but generation on `gpus` (whole nodes), placed by the
    synchronous search (the faster of colocate-all and auto); None if nothing fits."""
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
                          {}, None, problem.headroom)
    best = None
    for policy in ("colocate-all", "auto"):
        try:
            seconds = run_policy(sub_problem, policy).step_seconds
        except Infeasible:
            continue
        best = seconds if best is None else min(best, seconds)
    return best


def pool_splits(cluster: ClusterSpec) -> list[int]:
    """Generation pool sizes: whole nodes, leaving at least one node to train (one node:
    every split of its GPUs)."""
    g = cluster.gpus_per_node
    if cluster.nodes == 1:
        return list(range(1, g))
    return [k * g for k in range(1, cluster.nodes)]


def best_async(problem: Any, staleness: int) -> AsyncPlan | None:
    """The fastest split of the cluster into a generation and a training pool (module
    doc); None if the step has not exactly one generate call or no split fits."""
    gen = _gen_call(problem)
    if gen is None or staleness < 1:
        return None
    n = problem.cluster.num_gpus
    best: AsyncPlan | None = None
    for a in pool_splits(problem.cluster):
        g = streamed_generation(problem, gen, a, staleness)
        if g is None:
            continue
        t = training_side(problem, gen, n - a)
        if t is None:
            continue
        plan = AsyncPlan(staleness, a, n - a, g[0], push_seconds(problem, gen, g[1]), t,
                         g[1].text())
        if best is None or plan.step_seconds < best.step_seconds:
            best = plan
    return best


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


__all__ = ["AsyncPlan", "async_lower_bound", "best_async", "choose", "pool_splits",
           "push_seconds", "streamed_generation", "training_side"]


def async_pins(graph: Any, plan: AsyncPlan) -> dict[str, dict[str, Any]]:
    """Placement entries (graphrl.placement_file's form) putting generation on the first
    `gen_gpus` GPUs and every other call on the rest."""
    gen_pool = f"0-{plan.gen_gpus - 1}"
    train_pool = f"{plan.gen_gpus}-{plan.gen_gpus + plan.train_gpus - 1}"
    return {n.call: {"gpus": gen_pool if n.target == "generate" else train_pool}
            for n in graph.calls()}
