"""Pricing streamed generation as the executors run it (backends/stream_generation.py).

With `--staleness K` the generation pool runs each step's generate call in two halves
around the weight push: the head (weights v: the step's batch until each sequence has
`stream_cut` tokens or stopped) overlaps the training pool's calls; the tail (weights
v + 1, after the train and the push) finishes the batch's longer responses — their KV
recomputed first (AReaL, Fu et al. 2025, §4.1) — while the next batch's prompts take
the freed KV and run up to their own cut. So in steady state

    executed step = max(head, training pool's step) + push + tail

With streamed scoring and training (graphrl/stream_train.py) the training pool's
per-row forwards of batch n — and its one-pass train, in two parts with one optimizer
step — start on its head-finished groups right after the push, beside batch n's tail
(early seconds: those calls at the head part's share of the batch's tokens,
`head_share`), and do the other rows at the next step with the rest of the training
pool's work on batch n (rest seconds). From the dependencies (the push waits for the
head and for the train of the rest; the head part waits for the push on the same
training ranks; the next step starts when the tail and the head part are done):

    executed step = max(head, rest) + push + max(tail, early)

(`StreamPhases.step_split`); with nothing finished in the head (early 0) it is the
step above, and the compiler keeps the split only where it is shorter.

This module prices head and tail with graphrl/serving.py's continuous-batching model
(KV budget, chunked prefill, a per-decode-step cost that depends on the sequences
running and their context) — the same per-step terms as the synchronous price — by
simulating a few consecutive steps of the stream and taking the steady state. A
resumed sequence's KV recompute is charged as a prefill of prompt + cut tokens (the
prefill cost scaled by length; attention's quadratic term is ignored at these lengths).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

STEPS = 4          # simulated steps; the steady state is the mean of steps 1..STEPS-2


@dataclass(frozen=True)
class StreamPhases:
    head: float    # seconds of a step's head (before the push)
    tail: float    # seconds of its tail (after the push)

    @property
    def total(self) -> float:
        return self.head + self.tail

    def step(self, train_seconds: float, push_seconds: float) -> float:
        """The executed step with a training pool step of `train_seconds`."""
        return max(self.head, train_seconds) + push_seconds + self.tail

    def step_split(self, early: float, rest: float, push_seconds: float) -> float:
        """The executed step when the training pool's calls on batch n's head part
        (`early` seconds, graphrl/stream_train.py) run after the push, beside the tail,
        and the rest of its step (`rest`: the other part of those calls and everything
        else, on batch n - 1) beside the head: max(H, rest) + push + max(T, early).
        Never above `step` with early + rest = the whole training step."""
        return max(self.head, rest) + push_seconds + max(self.tail, early)


class _Seq:
    __slots__ = ("length", "done", "limit", "base", "watched")

    def __init__(self, length: int):
        self.length, self.done, self.limit = int(length), 0, 0
        self.base, self.watched = 0.0, False


class _Engine:
    """One replica's continuous batching, the serving model's rules (serving.py's
    simulate_replica), with sequences that stop at a `limit` (the cut) and resume."""

    def __init__(self, prompt: int, kv_tokens: float, prefill: Any, step: Any, chunk: int):
        self.prompt, self.kv, self.prefill, self.step_fn = prompt, kv_tokens, prefill, step
        self.chunk = chunk
        self.s = 0                                  # decode steps so far
        self.heap: list[tuple[int, int, _Seq]] = []   # (end step, id, sequence)
        self.reserved = 0.0
        self.base = 0.0                             # sum over running of prompt+done0-s0
        self.watching = 0                           # watched sequences short of limit

    def _admit(self, waiting: list[_Seq]) -> float:
        seconds, group = 0.0, []
        while waiting and (self.reserved + self.prompt + waiting[0].limit <= self.kv
                           or not self.heap and not group):
            q = waiting.pop(0)
            group.append(q)
            self.reserved += self.prompt + q.limit
        for i in range(0, len(group), self.chunk):
            part = group[i:i + self.chunk]
            ctx = sum(self.prompt + q.done for q in part) / len(part)
            seconds += self.prefill(len(part)) * ctx / self.prompt
        for q in group:
            q.done += 1                              # the prefill samples a token
            q.base = self.prompt + q.done - self.s
            self.base += q.base
            heapq.heappush(self.heap, (self.s + q.limit - q.done, id(q), q))
        self._retire()
        return seconds

    def _retire(self) -> None:
        while self.heap and self.heap[0][0] <= self.s:
            _, _, q = heapq.heappop(self.heap)
            q.done = q.limit
            self.watching -= q.watched
            q.watched = False
            self.reserved -= self.prompt + q.limit
            self.base -= q.base

    def run(self, waiting: list[_Seq], until: list[_Seq]) -> float:
        """Seconds until every sequence of `until` reached its limit; admits from
        `waiting` (in order) as KV frees."""
        seconds = 0.0
        for q in until:
            if q.done < q.limit and not q.watched:
                q.watched = True
                self.watching += 1
        while self.watching:
            seconds += self._admit(waiting)
            if not self.watching:   # the admitted prefill sampled their last tokens
                break
            if not self.heap:
                if not waiting:
                    raise ValueError("stream pricing: sequences wait for nothing")
                continue
            nxt = self.heap[0][0]
            k = nxt - self.s
            if k > 0:
                n = len(self.heap)
                mid = self.s + (k - 1) / 2.0
                seconds += k * self.step_fn(n, (self.base + n * mid) / n)
                self.s = nxt
            self._retire()
        return seconds


def simulate_stream(lengths: np.ndarray, prompt: int, cut: int, kv_tokens: float,
                    prefill: Any, step: Any, chunk: int, steps: int = STEPS) -> StreamPhases:
    """Steady-state head and tail seconds of a replica streaming batches whose responses
    have `lengths` (each batch in its own shuffled order)."""
    eng = _Engine(prompt, kv_tokens, prefill, step, chunk)
    batches = [[_Seq(x) for x in np.random.default_rng(b).permutation(lengths)]
               for b in range(steps + 1)]
    for q in batches[0]:
        q.limit = min(q.length, cut)
    waiting = list(batches[0])
    heads, tails = [], []
    for b in range(steps):
        heads.append(eng.run(waiting, batches[b]))
        # the push: this batch's paused sequences resume (KV recomputed) first, then the
        # next batch's prompts fill the freed KV up to their own cut
        resumed = [q for q in batches[b] if q.done < q.length]
        for q in resumed:
            q.limit = q.length
        for q in batches[b + 1]:
            q.limit = min(q.length, cut)
        waiting = resumed + waiting + batches[b + 1]
        tails.append(eng.run(waiting, batches[b]))
    lo, hi = 1, max(2, steps - 1)
    return StreamPhases(float(np.mean(heads[lo:hi])), float(np.mean(tails[lo:hi])))


def stream_phases(problem: Any, gen: Any, strategy: Any, cut: int) -> StreamPhases | None:
    """Head and tail seconds of generate call `gen` (graphrl.passes.search CallInfo) with
    `strategy`, streamed with `cut` (the stream batches continuously whatever the
    model's engine; an eager engine's per-step host overhead is kept); None with
    pipeline stages (the cost model's static pipelined batches)."""
    from . import cost as C
    from .lengths import fixed
    from .serving import GPU_MEMORY_UTILIZATION, PREFILL_CHUNK_TOKENS, _step_fn, \
        lengths_of_slowest_replica

    if strategy.pp > 1 or gen.new_tokens < 1:
        return None
    spec, gpu, params = problem.specs[gen.model], problem.cluster.gpu, problem.params
    dist = (problem.lengths or fixed(gen.new_tokens)).capped(gen.new_tokens)
    mine = lengths_of_slowest_replica(dist.quantiles(gen.batch), strategy.dp)
    prompt = gen.seq
    # the KV budget, as serving.serve_generate computes it for one batch in waves
    weights = C._weights_per_gpu(spec, strategy)
    kv_token = C.kv_cache_bytes(spec, 1, 1, strategy.tp, strategy.pp)
    chunk = max(1, min(len(mine), PREFILL_CHUNK_TOKENS // max(prompt, 1)))
    transient = (params.fwd_transient_bytes * chunk * prompt * spec.hidden_size
                 + params.logit_fwd_bytes * chunk * C._head_width(spec)) / strategy.tp
    limit = GPU_MEMORY_UTILIZATION * gpu.memory_bytes
    kv_tokens = max(kv_token * (prompt + int(mine.max())), limit - weights - transient) \
        / kv_token * (1 + 1e-12)
    prefill, step = _step_fn(spec, prompt, strategy, gpu, problem.gen_engine, params,
                             problem.cluster.gpus_per_node)
    phases = simulate_stream(mine, prompt, cut, kv_tokens, prefill, step, chunk)
    return StreamPhases(phases.head * gen.repeats, phases.tail * gen.repeats)


CUTS = tuple(i / 16 for i in range(4, 17))   # candidate cuts, of max_new_tokens


@dataclass(frozen=True)
class StreamChoice:
    cut: int
    phases: StreamPhases
    step_seconds: float
    split: tuple[float, float] | None = None   # (early, rest) training pool seconds


def best_stream(problem: Any, gen: Any, strategy: Any, train: float, push: float,
                split: Callable[[int], tuple[float, float]] | None = None
                ) -> StreamChoice | None:
    """The cut that makes the executed step shortest with a training pool step of
    `train` and a push of `push` seconds: a later cut moves work into the head (which
    overlaps training) but leaves the next batch less of the tail to start in; None
    where generation does not stream (stream_phases). `split(cut)`: (early, rest)
    seconds of the training pool when its calls start on the head part
    (StreamPhases.step_split), None: they wait for the whole batch."""
    best = None
    for f in CUTS:
        cut = max(1, int(round(gen.new_tokens * f)))
        c = priced_stream(problem, gen, strategy, cut, train, push)
        if c is None:
            return None
        if split is not None:
            both = priced_stream(problem, gen, strategy, cut, train, push, split)
            c = both if both.step_seconds < c.step_seconds else c
        if best is None or c.step_seconds < best.step_seconds:
            best = c
    return best


def priced_stream(problem: Any, gen: Any, strategy: Any, cut: int, train: float,
                  push: float, split: Callable[[int], tuple[float, float]] | None = None
                  ) -> StreamChoice | None:
    """The executed step at `cut` (best_stream's terms): with `split`, the marked calls
    start on the head part (step_split), else they wait for the whole batch; None where
    generation does not stream."""
    ph = stream_phases(problem, gen, strategy, cut)
    if ph is None:
        return None
    if split is None:
        return StreamChoice(cut, ph, ph.step(train, push))
    parts = split(cut)
    return StreamChoice(cut, ph, ph.step_split(*parts, push), parts)


def plan_sides(plan: Any, gen_node: str, scale: Mapping[str, float] | None = None,
               others: float = 1.0) -> tuple[float, float]:
    """(training pool's step, weight push) seconds in a lowered async plan whose generate
    node is `gen_node`: the training pool's calls run from the end of the push at the
    plan's start (the executors push at the end of the previous step instead, after the
    train, so in steady state the training pool starts at once). `scale`: node -> factor
    on its instructions' seconds, `others` the factor of every other node's (the
    training pool's work on a part of the batch, stream_train)."""
    from .simulate import simulate

    if scale is not None or others != 1.0:
        plan = _scaled(plan, gen_node, scale or {}, others)
    events, _ = simulate(plan)
    node = plan.graph.node(gen_node)
    pool = {f"gpu{g}" for g in node.placement.mesh.gpus}
    push_node = plan.graph.producers().get(node.inputs[0])
    push_name = push_node.name if push_node is not None else None
    pushes = [e for e in events if e.node == push_name]
    push_end = max((e.end for e in pushes), default=0.0)
    push = max((e.end - e.start for e in pushes), default=0.0)
    others = [e.end for e in events if e.worker not in pool and e.node not in
              (gen_node, push_name)]
    return max(max(others, default=push_end) - push_end, 0.0), push


def _scaled(plan: Any, gen_node: str, scale: Mapping[str, float], others: float) -> Any:
    from dataclasses import replace

    push = plan.graph.producers().get(plan.graph.node(gen_node).inputs[0])
    keep = {gen_node, push.name if push is not None else None}

    def f(i: Any) -> float:
        if i.node in keep and i.op in ("run", "reshard"):
            return 1.0
        return scale.get(i.node, others) if i.op == "run" else others
    return replace(plan, streams=tuple(replace(st, instrs=tuple(
        replace(i, seconds=i.seconds * f(i)) for i in st.instrs)) for st in plan.streams))


def head_share(problem: Any, gen: Any, cut: int, samples: int, draws: int = 8) -> float:
    """The head part's share of the training pool's per-token work on a batch: tokens
    (prompt + response) of the groups of `samples` whose responses all have at most
    `cut` tokens (stream_train.head_finished), over the whole batch's; the batch's
    lengths are the distribution's quantiles, grouped in `draws` seeded shuffles."""
    from .lengths import fixed
    from .stream_train import head_finished

    dist = (problem.lengths or fixed(gen.new_tokens)).capped(gen.new_tokens)
    lengths = dist.quantiles(gen.batch)
    g = max(int(samples), 1)
    if gen.batch % g:
        return 0.0
    total = float(np.sum(lengths + gen.seq))
    shares = []
    for d in range(draws):
        x = np.random.default_rng(d).permutation(lengths)
        done = np.array(head_finished(x.tolist(), cut, g))
        shares.append(float(np.sum((x + gen.seq)[done])) / total)
    return float(np.mean(shares))


__all__ = ["StreamChoice", "StreamPhases", "best_stream", "head_share", "plan_sides",
           "priced_stream", "simulate_stream", "stream_phases"]

