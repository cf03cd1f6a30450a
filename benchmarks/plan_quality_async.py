"""Plan quality of asynchronous off-policy steps (issue 20 item 5): `auto` allowed
staleness <= K against synchronous colocate-all on long-tail workloads sampled AT RANDOM
from a declared space (SPACE), each compiled as `graphrl compile --staleness K` does;
the number reported is each plan's predicted step (`Plan.predicted_step_seconds`: the
lowered plan, generation streamed as the executors run it), whether auto kept the
synchronous plan or took the asynchronous one.

    python benchmarks/plan_quality_async.py                 # 24 workloads, seed 0
    python benchmarks/plan_quality_async.py --n 8 --seed 3 --out /tmp/a.md
    python benchmarks/plan_quality_async.py --suite    # plan_quality.py's six cases

benchmarks/plan_quality.py calls `async_rows` / `markdown_section` on its own long-tail
cases at >= 64 GPUs (staleness 1), so its report carries the same columns for them.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plan_quality as pq  # noqa: E402
import graphrl  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.lengths import parse as parse_lengths  # noqa: E402

MIN_GPUS = 64
TARGET = 1.5     # geometric-mean speedup of auto over synchronous colocate-all
DEFAULT_OUT = ROOT / "docs" / "async_steps.md"
GROUP = 4        # GRPO responses per prompt (examples/grpo.py GROUP_SIZE)
PROMPT_LEN = 1024
SPACE = {        # the declared space workloads are drawn from, uniformly per field
    "algo": ("ppo", "grpo"),
    "size": ("7b", "13b", "34b", "70b"),          # every model of the step (Llama-2 shapes)
    "nodes": (8, 16, 32),                         # x 8 H100-80G: 64-256 GPUs
    "batch": (128, 256, 512, 1024),               # sequences per step
    "mean": (1024, 6144),                         # lognormal mean response tokens, range
    "cap": (8192, 16384, 32768),                  # max response tokens (>= 2 x mean)
    "staleness": (1, 4),                          # the --staleness bound, range
}


@dataclass(frozen=True)
class Workload:
    algo: str
    size: str
    nodes: int
    batch: int       # sequences
    mean: int
    cap: int
    staleness: int

    @property
    def dist(self) -> str:
        return f"lognormal:mean={self.mean},max={self.cap}"

    @property
    def cluster(self) -> str:
        return f"{self.nodes}x8xH100-80G"

    @property
    def name(self) -> str:
        return (f"{self.algo} {self.size} b{self.batch} tail{self.mean / 1024:.2g}k-"
                f"{self.cap // 1024}k {self.nodes}x8 K<={self.staleness}")

    def graph(self) -> Any:
        if self.algo not in pq._BUILDS:
            pq._BUILDS[self.algo] = pq.load_example(str(ROOT / "examples" / f"{self.algo}.py"))
        prompts = self.batch // GROUP if self.algo == "grpo" else self.batch
        opts = graphrl.RunOptions(model_size=f"{self.size}-64k", prompt_len=PROMPT_LEN,
                                  response_len=self.cap, batch_size=prompts)
        return pq._BUILDS[self.algo](opts).program().graph


def sample(n: int, seed: int) -> list[Workload]:
    """n workloads drawn from SPACE with random.Random(seed): each field uniform over its
    choices (ranges: uniform integers, the mean rounded to 256 tokens), the cap among
    those at least twice the mean."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mean = 256 * round(rng.randint(*SPACE["mean"]) / 256)
        out.append(Workload(rng.choice(SPACE["algo"]), rng.choice(SPACE["size"]),
                            rng.choice(SPACE["nodes"]), rng.choice(SPACE["batch"]), mean,
                            rng.choice([c for c in SPACE["cap"] if c >= 2 * mean]),
                            rng.randint(*SPACE["staleness"])))
    return out


@dataclass(frozen=True)
class AsyncRow:
    case: str
    colocate: float | None    # synchronous colocate-all, the lowered plan's step
    auto: float | None        # auto with --staleness K: the plan's predicted step
    auto_sync: float | None   # auto's synchronous plan
    async_step: float | None  # the best async plan's lowered step (chosen or not)
    pools: str                # its generation + training GPUs
    staleness: int            # what auto runs (0: synchronous)
    why: str                  # why the async plan lost, or why none ran
    terms: tuple[float, float, float, float] | None = None  # head, train, push, tail (priced)
    seconds: float = 0.0      # compile wall time of the case
    error: str = ""

    @property
    def speedup(self) -> float | None:
        return self.colocate / self.auto if self.colocate and self.auto else None

    speedup_executed = speedup   # plan_quality.py's name: the same plans

    @property
    def async_speedup(self) -> float | None:
        return self.colocate / self.async_step if self.colocate and self.async_step else None


def evaluate(name: str, graph: Any, cluster: ClusterSpec, dist: Any, staleness: int,
             colocate: float | None = None) -> AsyncRow:
    """One workload: colocate-all (compiled here unless given) and auto with staleness
    <= K, as `graphrl compile` plans them."""
    t0 = time.perf_counter()
    kw = dict(gen_engine=pq.GEN_ENGINE, response_lengths=dist)
    if colocate is None:
        try:
            colocate = compile_graph(graph, cluster, "colocate-all", **kw
                                     ).plan.predicted_step_seconds
        except graphrl.GraphRLError:
            colocate = None
    try:
        c = compile_graph(graph, cluster, "auto", staleness=staleness, **kw)
    except graphrl.GraphRLError as e:
        return AsyncRow(name, colocate, None, None, None, "", 0, "", None,
                        time.perf_counter() - t0, str(e).splitlines()[0])
    r = c.findings["async_report"]
    p = r.plan
    terms = (p.head, p.train_seconds, p.push_seconds, p.tail) if p is not None else None
    return AsyncRow(name, colocate, c.plan.predicted_step_seconds, r.sync_seconds,
                    r.lowered_seconds, p.pools if p else "", r.staleness, r.why, terms,
                    time.perf_counter() - t0)


def geomean(xs: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _f(x: float | None, unit: str = "") -> str:
    return f"{x:.2f}{unit}" if x is not None else "-"


def table(rows: Sequence[AsyncRow]) -> list[str]:
    out = ["| workload | colocate-all s | auto sync s | best async s (gen+train GPUs) | "
           "auto runs | auto s | auto vs colocate-all | async: head / train / push / tail "
           "s (priced) | why async lost |",
           "|---|---:|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        terms = " / ".join(f"{t:.1f}" for t in r.terms) if r.terms else "-"
        runs = f"async K={r.staleness}" if r.staleness else "sync"
        out.append(f"| {r.case} | {_f(r.colocate)} | {_f(r.auto_sync)} | {_f(r.async_step)} "
                   f"({r.pools or '-'}) | {runs} | {_f(r.auto)} | {_f(r.speedup, 'x')} | "
                   f"{terms} | {(r.why or r.error).replace('|', '/')} |")
    return out


def summary(rows: Sequence[AsyncRow]) -> dict[str, Any]:
    xs = [r.speedup for r in rows if r.speedup]
    sync = [r.colocate / r.auto_sync for r in rows if r.colocate and r.auto_sync]
    asy = [r.async_speedup for r in rows if r.async_speedup]
    tails = [r.terms[3] / r.async_step for r in rows if r.terms and r.async_step]
    return {"n": len(rows), "scored": len(xs), "min": min(xs, default=None),
            "median": statistics.median(xs) if xs else None, "geomean": geomean(xs),
            "max": max(xs, default=None), "async_chosen": sum(bool(r.staleness) for r in rows),
            "sync_geomean": geomean(sync), "async_geomean": geomean(asy),
            "tail_share": statistics.median(tails) if tails else None}


def summary_lines(s: dict[str, Any]) -> list[str]:
    g = s["geomean"]
    return [f"auto (staleness <= K) over synchronous colocate-all, {s['scored']} of {s['n']} "
            f"workloads scored: min {_f(s['min'], 'x')}, median {_f(s['median'], 'x')}, "
            f"**geometric mean {_f(g, 'x')}**, max {_f(s['max'], 'x')} (target >= {TARGET}x: "
            f"{'met' if g is not None and g >= TARGET else 'NOT met'}); auto ran async on "
            f"{s['async_chosen']}.",
            "",
            f"For comparison, geometric means over colocate-all: auto's synchronous plan "
            f"{_f(s['sync_geomean'], 'x')}; the best asynchronous plan alone (lowered, "
            f"chosen or not) {_f(s['async_geomean'], 'x')}. Median share of the async step "
            f"spent in the tail (the batch's longest responses, after the push): "
            f"{_f(None if s['tail_share'] is None else 100 * s['tail_share'])}%."]


def async_rows(results: Sequence[Any]) -> list[AsyncRow]:
    """Rows for plan_quality.py's long-tail cases at >= 64 GPUs (staleness 1), reusing
    the colocate-all step it already compiled."""
    out = []
    for r in results:
        if not (r.case.tail and r.case.gpus >= MIN_GPUS):
            continue
        col = r.results["colocate-all"]
        out.append(evaluate(r.case.name, pq.build_graph(r.case),
                            ClusterSpec.parse(r.case.cluster), r.case.dist, 1,
                            col.step_seconds if col.status == "ok" else None))
    return out


def async_cases() -> list[Any]:
    """plan_quality.py's own long-tail cases at >= 64 GPUs (its Case objects)."""
    return [c for c in pq.tail_suite() if c.gpus >= MIN_GPUS]


def suite_rows() -> list[AsyncRow]:
    """Rows for plan_quality.py's own long-tail cases at >= 64 GPUs, compiled here."""
    return [evaluate(c.name, pq.build_graph(c), ClusterSpec.parse(c.cluster), c.dist, 1)
            for c in async_cases()]


def markdown_section(results: Sequence[Any], rows: Sequence[AsyncRow] | None = None
                     ) -> list[str]:
    """The async table for plan_quality.py's report, from its CaseResults (or the rows
    already computed from them)."""
    rows = async_rows(results) if rows is None else list(rows)
    if not rows:
        return []
    return ["", "## Asynchronous steps (staleness <= 1, long-tail cases >= 64 GPUs)", "",
            "From benchmarks/plan_quality_async.py (graphrl/async_cost.py, "
            "graphrl/async_compile.py); each auto step is the plan `graphrl compile "
            "--staleness 1` predicts. docs/async_steps.md samples workloads at random.", ""] \
        + table(rows) + [""] + summary_lines(summary(rows))


def one_pass(graph: Any) -> Any:
    """The step with one optimizer pass per train (epochs = minibatches = 1) and GAE
    without whitening: the form whose trains may start on the head part too
    (graphrl/stream_train.py)."""
    from dataclasses import replace

    for n in graph.nodes:
        attrs = dict(n.attrs)
        if n.target == "train":
            attrs.update(epochs=1, minibatches=1)
        elif n.target == "gae":
            attrs["whiten"] = False
        else:
            continue
        graph = graph.replace_node(n.name, replace(n, attrs=tuple(sorted(attrs.items()))))
    return graph


MODEL_NOTES = """\
## How auto plans an asynchronous step

`graphrl compile --staleness K` (graphrl/async_compile.py) compiles the synchronous plan,
then searches the asynchronous ones (graphrl/async_cost.py): every split of the cluster
into a generation pool and a training pool of whole nodes (one node: every split of its
GPUs), each priced as the executors run it (backends/stream_generation.py, priced by
graphrl/stream_cost.py on graphrl/serving.py's continuous-batching model): each step's
generate call runs a head (the batch's sequences up to `stream_cut` response tokens,
with the step's weights) while the training pool trains, then, after the train and the
weight push, a tail that finishes the batch's longer responses with the new weights (KV
recomputed, AReaL §4.1) while the next batch's prompts take the freed KV up to their
own cut:

    step = max(head, training pool) + push + tail

with the training pool's calls all on the whole pool (as the plan pins them, strategies
from the synchronous search), the push each generation GPU's weight shard over the
inter-node link, and the cut (1/4 .. 1 of the response budget, in sixteenths) that makes
the step shortest. A split whose generation or training side does not fit is skipped
with its reason. The fastest priced splits are then lowered (the staleness rewrite
pinned to the two pools; a split the placement cannot realise is skipped, never blamed
on the user's pins) and priced again as executed (`as_executed`, which may also start
scoring and one-pass trains on the batch's head-finished groups, graphrl/stream_train.py);
auto takes the async plan only where that lowered step beats its synchronous plan, and
`graphrl compile` prints the best async plan, its step and why it lost where it lost.

Staleness: the executors run the same step for every K >= 1 (the generation pool waits
for each step's weight push; a deeper rollout queue only delays when training reads a
batch) and only K = 1 lets training start on head-finished groups, so the fastest plan
within any bound is K = 1; a larger bound buys nothing here.

## What dominates, and what would go further

The async step is dominated by the tail: the batch's longest responses, decoded after
the push (the "tail share" above). A sequence switches weights once, at the cut, and
must finish within the step after the one it started in, so each step waits for the
decode latency of the longest responses past the cut, however many GPUs generate —
more generation GPUs shorten the body of the batch, not that latency. AReaL (Fu et al.
2025, arXiv 2505.24298) and verl's fully-async recipe go further (2.35-2.77x on such
workloads) with interruptible generation: a long response continues across several
weight updates (partial rollouts up to the staleness bound), so no step waits for it.
The executors here do not run that mode, so it is not priced.
"""


def run(n: int = 24, seed: int = 0, out: Path | str | None = DEFAULT_OUT,
        verbose: bool = True) -> list[AsyncRow]:
    say = print if verbose else (lambda *a, **k: None)
    pq.warm_up()
    t0 = time.perf_counter()
    rows = []
    for w in sample(n, seed):
        rows.append(evaluate(w.name, w.graph(), ClusterSpec.parse(w.cluster),
                             parse_lengths(w.dist), w.staleness))
        r = rows[-1]
        say(f"{r.case}: colocate {_f(r.colocate)} auto {_f(r.auto)} "
            f"({'async' if r.staleness else 'sync'}; best async {_f(r.async_step)} "
            f"{r.pools}) {_f(r.speedup, 'x')} [{r.seconds:.0f} s] {r.why or r.error}",
            flush=True)
    s = summary(rows)
    lines = table(rows)
    say("\n".join(summary_lines(s)))
    if out is not None:
        space = "; ".join(f"{k} {v[0]}-{v[1]}" if k in ("mean", "staleness")
                          else f"{k} {'/'.join(map(str, v))}" for k, v in SPACE.items())
        text = "\n".join([
            "# Asynchronous off-policy steps: predicted speedup on sampled workloads", "",
            f"Generated by `python benchmarks/plan_quality_async.py --n {n} --seed {seed}` "
            f"({time.perf_counter() - t0:.0f} s). Source: {pq.source_state()}.", "",
            f"{n} long-tail workloads drawn at random (seed {seed}) from the declared space "
            f"({space}; prompts {PROMPT_LEN} tokens; GRPO answers each prompt {GROUP} "
            "times; every model of the step at the size drawn, 64k context; H100-80G, "
            "graph generation engine), not picked by hand. Each is compiled twice: "
            "synchronous colocate-all, and auto allowed staleness <= K as `graphrl "
            "compile --staleness K` plans it; the auto column is that plan's predicted "
            "step, whichever of its synchronous and asynchronous plans it chose.", "",
            *summary_lines(s), "", *lines, "", MODEL_NOTES, ""])
        Path(out).write_text(text)
        say(f"wrote {out}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plan_quality_async.py", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--n", type=int, default=24, help="workloads to sample (default 24)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", default=str(DEFAULT_OUT), metavar="FILE.md")
    p.add_argument("--suite", action="store_true",
                   help="instead: print plan_quality.py's async section for its own "
                        "long-tail cases at >= 64 GPUs (the section of docs/plan_quality.md)")
    ns = p.parse_args(argv)
    if ns.suite:
        pq.warm_up()
        print("\n".join(markdown_section([], suite_rows())))
        return 0
    run(ns.n, ns.seed, ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
