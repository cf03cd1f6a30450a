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


def async_row(case: Any, colocate: float | None = None, auto_sync: float | None = None
              ) -> AsyncRow:
    """One case: the sync steps (compiled here unless given) and the async plan."""
    graph = pq.build_graph(case)
    cluster = ClusterSpec.parse(case.cluster)
    if colocate is None:
        colocate = _step(pq.compile_one(graph, cluster, "colocate-all", case.dist))
    if auto_sync is None:
        auto_sync = _step(pq.compile_one(graph, cluster, "auto", case.dist))
    problem = problem_from_graph(graph, PassContext(cluster, gen_engine=pq.GEN_ENGINE,
                                                    lengths=case.dist))
    plan = best_async(problem, STALENESS)
    bound = async_lower_bound(problem, STALENESS)
    return AsyncRow(case.name, colocate, auto_sync, plan.step_seconds if plan else None,
                    bound, f"{plan.gen_gpus}+{plan.train_gpus}" if plan else "",
                    plan.text() if plan else "no split fits",
                    lowered_async(graph, cluster, plan, case.dist, problem) if plan else None)


def lowered_async(graph: Any, cluster: ClusterSpec, plan: Any, lengths: Any,
                  problem: Any) -> float | None:
    """The step of the staleness-1 rewrite lowered on the plan's pools, priced as the
    executors run it (streamed generation, graphrl.async_compile.as_executed)."""
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
        return None
    return as_executed(out, problem).plan.predicted_step_seconds


def _step(result: Any) -> float | None:
    return result.step_seconds if result.status == "ok" else None


def geomean(xs: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def table(rows: Sequence[AsyncRow]) -> list[str]:
    def f(x: float | None, unit: str = "") -> str:
        return f"{x:.2f}{unit}" if x is not None else "-"
    out = ["| case | colocate-all sync s | auto sync s | auto async s (gen+train GPUs) | "
           "async lower bound s | auto (staleness <= 1) vs colocate-all | "
           "async as executed (lowered) s | vs colocate-all as executed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.case} | {f(r.colocate)} | {f(r.auto_sync)} | "
                   f"{f(r.async_step)} ({r.split}) | {f(r.bound)} | {f(r.speedup, 'x')} | "
                   f"{f(r.executable)} | {f(r.speedup_executed, 'x')} |")
    g = geomean([r.speedup for r in rows if r.speedup])
    g_exec = geomean([r.speedup_executed for r in rows if r.speedup_executed])
    out += ["", f"Geometric-mean speedup of auto with staleness <= {STALENESS} over "
                f"synchronous colocate-all: **{f(g, 'x')}** (target >= {TARGET}x: "
                f"{'met' if g is not None and g >= TARGET else 'NOT met'}); async step over "
                f"its lower bound, geometric mean: "
                f"{f(geomean([r.async_step / r.bound for r in rows if r.async_step and r.bound]), 'x')}.",
            "", f"As executed today (the lowered async plan, whole-batch generation; what "
                f"`graphrl compile --staleness 1` chooses on): **{f(g_exec, 'x')}**."]
    return out


def markdown_section(results: Sequence[Any]) -> list[str]:
    """The async table for plan_quality.py's report, from its CaseResults."""
    rows = [async_row(r.case, _step(r.results["colocate-all"]), _step(r.auto))
            for r in results if r.case.tail and r.case.gpus >= MIN_GPUS]
    if not rows:
        return []
    return ["", "## Asynchronous steps (staleness <= 1, long-tail cases >= 64 GPUs)", "",
            "From benchmarks/plan_quality_async.py (model: graphrl/async_cost.py).", ""] + \
        table(rows)


MODEL_NOTES = """\
How the async step is priced (graphrl/async_cost.py): generation on a pool of whole nodes,
training (every other call) on the rest, step = max(weight push + generation of one batch,
the training pool's step). Generation is the serving model of graphrl/serving.py fed a
stream of K+1 = 2 batches, so a batch's long tail overlaps the next batch's body (what
AReaL's interruptible, continuously fed generation does); the training pool is placed by
the synchronous search (faster of colocate-all and auto). The lower bound takes, for the
best split, the larger of the fastest streamed generation on the generation pool and the
fastest train call alone on the training pool (forwards, ops and the push count zero),
and never less than the least GPU-seconds of both spread over the cluster.

What this does not yet model: the executors run the batch-granular queue of
passes/staleness.py (generation of step n overlaps training of step n-1 on disjoint
pools); they do not interrupt generation for a weight push or refill a finishing batch's
slots with the next batch's prompts, which the streamed pricing assumes. The lowered plan
of the rewritten graph (`graphrl compile --staleness 1`) prices one batch's generation
with its whole tail, so it is slower than the async price in this table."""


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
    if out is not None:
        text = "\n".join(["# Asynchronous off-policy steps: predicted speedup", "",
                          "Generated by `python benchmarks/plan_quality_async.py` "
                          f"({time.perf_counter() - t0:.0f} s). Source: {pq.source_state()}.",
                          "", *lines, "", MODEL_NOTES, ""])
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
