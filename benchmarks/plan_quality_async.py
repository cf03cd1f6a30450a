"""Plan quality of asynchronous off-policy steps (issue 13 item 5, async target):
`auto` allowed staleness <= 1 against synchronous colocate-all on the long-tail cases at
>= 64 GPUs, with the async lower bound beside it (graphrl/async_cost.py).

    python benchmarks/plan_quality_async.py              # writes docs/async_steps.md
    python benchmarks/plan_quality_async.py --out /tmp/a.md

benchmarks/plan_quality.py calls `markdown_section` on its own results (the long-tail
cases it already compiled), so its report carries the same table.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plan_quality as pq  # noqa: E402
from graphrl.async_cost import async_lower_bound, best_async  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.passes.assign_devices import problem_from_graph  # noqa: E402
from graphrl.passes.base import PassContext  # noqa: E402

MIN_GPUS = 64
STALENESS = 1
TARGET = 1.5     # issue 13: geometric-mean speedup over synchronous colocate-all
DEFAULT_OUT = ROOT / "docs" / "async_steps.md"


@dataclass(frozen=True)
class AsyncRow:
    case: str
    colocate: float | None     # synchronous colocate-all, lowered plan
    auto_sync: float | None    # synchronous auto, lowered plan
    async_step: float | None   # best async split (priced)
    bound: float | None        # async lower bound
    split: str
    detail: str
    executable: float | None = None   # the lowered plan of the staleness-1 rewrite
    early: str = ""                   # calls that start on the head part (stream_train)

    @property
    def speedup_executed(self) -> float | None:
        """Over colocate-all, counting async at its executable (lowered) plan."""
        options = [x for x in (self.auto_sync, self.executable) if x is not None]
        return self.colocate / min(options) if self.colocate and options else None

    @property
    def auto(self) -> float | None:
        """auto with staleness <= 1: async if it pays, else synchronous auto."""
        options = [x for x in (self.auto_sync, self.async_step) if x is not None]
        return min(options) if options else None

    @property
    def speedup(self) -> float | None:
        return self.colocate / self.auto if self.colocate and self.auto else None


def async_cases() -> list[Any]:
    return [c for c in pq.tail_suite() if c.gpus >= MIN_GPUS]


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


def async_row(case: Any, colocate: float | None = None, auto_sync: float | None = None,
              variant: Any = None) -> AsyncRow:
    """One case: the sync steps (compiled here unless given) and the async plan;
    `variant`: a function of the case's graph (one_pass)."""
    graph = pq.build_graph(case)
    graph = variant(graph) if variant is not None else graph
    cluster = ClusterSpec.parse(case.cluster)
    if colocate is None:
        colocate = _step(pq.compile_one(graph, cluster, "colocate-all", case.dist))
    if auto_sync is None:
        auto_sync = _step(pq.compile_one(graph, cluster, "auto", case.dist))
    problem = problem_from_graph(graph, PassContext(cluster, gen_engine=pq.GEN_ENGINE,
                                                    lengths=case.dist))
    plan = best_async(problem, STALENESS)
    bound = async_lower_bound(problem, STALENESS)
    lowered, early = (lowered_async(graph, cluster, plan, case.dist, problem) if plan
                      else (None, ""))
    return AsyncRow(case.name, colocate, auto_sync, plan.step_seconds if plan else None,
                    bound, f"{plan.gen_gpus}+{plan.train_gpus}" if plan else "",
                    plan.text() if plan else "no split fits", lowered, early)


def lowered_async(graph: Any, cluster: ClusterSpec, plan: Any, lengths: Any,
                  problem: Any) -> tuple[float | None, str]:
    """The step of the staleness-1 rewrite lowered on the plan's pools, priced as the
    executors run it (streamed generation, graphrl.async_compile.as_executed), and the
    calls that start on the head part."""
    import graphrl
    from graphrl.async_compile import as_executed
    from graphrl.async_cost import async_pins
    from graphrl.compiler import compile_graph
    from graphrl.passes.staleness import carry_rollouts

    rewritten = carry_rollouts(graph, STALENESS)
    try:
        out = compile_graph(rewritten, cluster, "auto", placement=async_pins(rewritten, plan),
                            gen_engine=pq.GEN_ENGINE, response_lengths=lengths)
    except graphrl.GraphRLError:
        return None, ""
    out = as_executed(out, problem)
    split = out.findings.get("stream_split")
    early = [c.lstrip("%") for c in split.calls
             if out.graph.node(c).kind == "call"] if split is not None else []
    return out.plan.predicted_step_seconds, ", ".join(early) or "none"


def _step(result: Any) -> float | None:
    return result.step_seconds if result.status == "ok" else None


def geomean(xs: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def table(rows: Sequence[AsyncRow]) -> list[str]:
    def f(x: float | None, unit: str = "") -> str:
        return f"{x:.2f}{unit}" if x is not None else "-"
    out = ["| case | colocate-all sync s | auto sync s | auto async s (gen+train GPUs) | "
           "async lower bound s | auto (staleness <= 1) vs colocate-all | "
           "async as executed (lowered) s | vs colocate-all as executed | "
           "start on the head part |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r.case} | {f(r.colocate)} | {f(r.auto_sync)} | "
                   f"{f(r.async_step)} ({r.split}) | {f(r.bound)} | {f(r.speedup, 'x')} | "
                   f"{f(r.executable)} | {f(r.speedup_executed, 'x')} | {r.early} |")
    g = geomean([r.speedup for r in rows if r.speedup])
    g_exec = geomean([r.speedup_executed for r in rows if r.speedup_executed])
    out += ["", f"Geometric-mean speedup of auto with staleness <= {STALENESS} over "
                f"synchronous colocate-all: **{f(g, 'x')}** (target >= {TARGET}x: "
                f"{'met' if g is not None and g >= TARGET else 'NOT met'}); async step over "
                f"its lower bound, geometric mean: "
                f"{f(geomean([r.async_step / r.bound for r in rows if r.async_step and r.bound]), 'x')}.",
            "", f"As executed (the lowered async plan with generation streamed as the "
                f"executors run it, head and tail around the weight push, the cut chosen by "
                f"the compiler; what `graphrl compile --staleness 1` chooses on): "
                f"**{f(g_exec, 'x')}** (target >= {TARGET}x: "
                f"{'met' if g_exec is not None and g_exec >= TARGET else 'NOT met'})."]
    return out


def async_rows(results: Sequence[Any]) -> list[AsyncRow]:
    """The async rows of plan_quality.py's long-tail cases at >= 64 GPUs."""
    return [async_row(r.case, _step(r.results["colocate-all"]), _step(r.auto))
            for r in results if r.case.tail and r.case.gpus >= MIN_GPUS]


def markdown_section(results: Sequence[Any], rows: Sequence[AsyncRow] | None = None
                     ) -> list[str]:
    """The async table for plan_quality.py's report, from its CaseResults (or the rows
    already computed from them)."""
    rows = async_rows(results) if rows is None else list(rows)
    if not rows:
        return []
    return ["", "## Asynchronous steps (staleness <= 1, long-tail cases >= 64 GPUs)", "",
            "From benchmarks/plan_quality_async.py (model: graphrl/async_cost.py).", ""] + \
        table(rows)


MODEL_NOTES = """\
How the async step is priced (graphrl/async_cost.py): generation on a pool of whole nodes,
training (every other call) on the rest. The "auto async" column is the ideal stream:
step = max(weight push + generation of one batch, the training pool's step), generation
being the serving model of graphrl/serving.py fed a stream of K+1 = 2 batches, so a
batch's long tail overlaps the next batch's body; the training pool is placed by the
synchronous search (faster of colocate-all and auto). The lower bound takes, for the best
split, the larger of the fastest streamed generation on the generation pool (under
either stream model: the ideal stream above, or the executors' head + tail at any cut,
which never drains between batches and so can beat the ideal stream's drained bursts
where tails are long) and the fastest train call alone on the training pool (forwards,
ops and the push count zero), and never less than the least GPU-seconds of both spread
over the cluster.

The "as executed" column is what the executors run (backends/stream_generation.py,
priced by graphrl/stream_cost.py on the same serving model): each step's generate call
runs a head (the batch's sequences up to `stream_cut` response tokens, with the step's
weights) while the training pool trains, then — after the train and the weight push — a
tail that finishes the batch's longer responses with the new weights (KV recomputed,
AReaL §4.1) while the next batch's prompts take the freed KV up to their own cut. So
step = max(head, training pool) + push + tail, with the training pool's step and the
push taken from the lowered plan of the rewritten graph, and the cut the compiler picks
(of 1/4 .. 1 of the response budget, in sixteenths) to make it shortest.

Streamed scoring and training (graphrl/stream_train.py): the groups of a batch whose
responses all finished within the cut are complete at the end of its head, so the
training pool's per-row forwards (reference, reward, critic, the policy's proximal
log-probs) start on them after the push, beside the tail, and do the rest of the rows at
the next step (AReaL starts training on finished samples as they arrive). A train with
one optimizer pass whose advantages are per group or per sequence starts there too: it
accumulates the head part's gradient and takes its one optimizer step after the rest,
each part weighted by its share of the loss tokens (train_loop.TwoParts: the unsplit
update up to float summation order). With early = the training pool's work on the head
part (its share of the batch's tokens) and rest = its other work:
step = max(head, rest) + push + max(tail, early); the compiler takes it only where it is
shorter than max(head, training pool) + push + tail (otherwise the calls wait, and the
plan says so). In the suite's examples the trains wait (epochs = minibatches = 2: an
update needs rows of both parts; PPO also whitens its advantages over the batch), so
only the forwards start early; the one-pass table below shows the same cases with
trains that may start early too. A two-part train keeps a copy of the head part's
gradient until the rest arrives (2 bytes per parameter of its shard); where its GPUs
cannot hold that beside the call's peak and the other resident models, within the
headroom, it takes the batch in one call and the plan says so.

Why "as executed" stays above the ideal stream: the train and the rest of the forwards
still wait for the tail, which holds each batch's longest responses; AReaL switches
weights whenever they arrive (wall-clock), so its tails run through training; here the
switch is at a fixed token index so that runs are deterministic and the local and Ray
backends sample the same tokens.
"""


def run(out: Path | str | None = DEFAULT_OUT, verbose: bool = True) -> list[AsyncRow]:
    say = print if verbose else (lambda *a, **k: None)
    pq.warm_up()
    t0 = time.perf_counter()
    rows = []
    for case in async_cases():
        rows.append(async_row(case))
        say(f"{rows[-1].case}: {rows[-1].detail}", flush=True)
    lines = table(rows)
    say("\n".join(lines))
    passes = [async_row(case, variant=one_pass) for case in async_cases()]
    extra = table(passes)
    say("\n".join(extra))
    g = geomean([r.speedup_executed for r in passes if r.speedup_executed])
    if out is not None:
        text = "\n".join(["# Asynchronous off-policy steps: predicted speedup", "",
                          "Generated by `python benchmarks/plan_quality_async.py` "
                          f"({time.perf_counter() - t0:.0f} s). Source: {pq.source_state()}.",
                          "", *lines, "", MODEL_NOTES, "",
                          "## The same cases with one optimizer pass", "",
                          "Not the suite (its examples train with epochs = minibatches = 2, "
                          "PPO whitens its advantages): the same cases with epochs = "
                          "minibatches = 1 and GAE without whitening, each against its own "
                          "synchronous colocate-all, so that the trains (and the advantage "
                          "ops feeding them) may start on the head part too "
                          "(graphrl/stream_train.py; train_loop.TwoParts, in the HF and "
                          "megatron-core engines; a DeepSpeed train waits); the last column "
                          "names what starts early. As executed, geometric mean: "
                          f"**{g:.2f}x**." if g else "", "", *extra, ""])
        Path(out).write_text(text)
        say(f"wrote {out}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plan_quality_async.py", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), metavar="FILE.md")
    ns = p.parse_args(argv)
    run(ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
