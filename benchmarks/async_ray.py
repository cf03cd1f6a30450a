"""Measured: an asynchronous step (--staleness 1) against the synchronous one on the same
Ray cluster and the same disjoint pools (fake GPUs on CPU, one thread per rank):
`--gpus 2` (default) puts generation on GPU 0 and every other call on GPU 1; `--gpus 4`
generation on 0-1 and the rest on 2-3 (policy.train FSDP dp=2).

Synchronous, the training pool waits for generation and generation for training; with
staleness 1 the step's generation (for the next step) runs while the training pool
scores and trains on the previous step's rollouts, streamed (backends/
stream_generation.py) with the cut the compiler picks for this plan
(graphrl.async_compile.as_executed), so a step costs about the longer of the two
instead of their sum. Both runs use the GRPO example (no reward-model pre-training: its
weights do not change the timing) and are interleaved in rounds so that machine load
hits both alike; the warm-up step and each run's first trained step are not counted.

    python benchmarks/async_ray.py                 # writes docs/async_ray.md
    python benchmarks/async_ray.py --steps 6 --rounds 2 --out /tmp/a.md
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "examples"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import graphrl as gr  # noqa: E402
from graphrl.cli import load_example  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "async_ray.md"
POOLS = {4: {"policy.generate": {"gpus": "0-1"},
             "policy.train": {"gpus": "2-3", "dp": 2, "zero": 3},
             "reference.forward": {"gpus": "2-3"}, "reward.forward": {"gpus": "2-3"}},
         2: {"policy.generate": {"gpus": "0"}, "policy.train": {"gpus": "1"},
             "reference.forward": {"gpus": "1"}, "reward.forward": {"gpus": "1"}}}
LAYOUT = {4: "generation on GPUs 0-1, every other call on 2-3 (policy.train FSDP dp=2)",
          2: "generation on GPU 0, every other call on GPU 1"}


def experiment(batch: int, response_len: int, context: int = 0) -> Any:
    """The GRPO example without reward-model pre-training; `context` > 0: its three tiny
    models with that many positions (so responses may be longer than the default 64)."""
    build = load_example(str(ROOT / "examples" / "grpo.py"))
    configs: tuple[tuple[str, str], ...] = ()
    if context:
        import json
        import tempfile

        sys.path.insert(0, str(ROOT / "examples"))
        from common import llama_config

        folder = Path(tempfile.mkdtemp(prefix="async_ray_"))
        path = folder / "config.json"
        path.write_text(json.dumps(llama_config(context=context)))
        configs = tuple((role, str(path)) for role in ("policy", "reference", "reward"))
    exp = build(gr.RunOptions(batch_size=batch, response_len=response_len,
                              model_config=configs))
    return dataclasses.replace(exp, prepare=None)


def compiled(exp: Any, staleness: int, gpus: int) -> tuple[Any, Any]:
    """(program, plan) of the step on the pinned pools; async: with the stream cut the
    compiler picks for it (graphrl.async_compile.as_executed)."""
    from graphrl.async_compile import as_executed
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph
    from graphrl.passes.assign_devices import problem_from_graph
    from graphrl.passes.base import PassContext

    cluster = ClusterSpec.parse(f"1x{gpus}xcpu")
    program = exp.program(staleness)
    out = compile_graph(program.graph, cluster, "auto", placement=POOLS[gpus], engines=True)
    if staleness:
        sync = exp.program(0).graph
        out = as_executed(out, problem_from_graph(sync, PassContext(cluster)))
    return program, out.plan


def measure(exp: Any, staleness: int, steps: int, gpus: int, seed: int = 0,
            calls: dict[str, list[float]] | None = None) -> list[float]:
    """Seconds of each trained step after the first, on a fresh executor; `calls`
    gathers each call's seconds per counted step (the sum over its ranks' stamps over
    the ranks: a rank's mean busy time in that call)."""
    from graphrl.backends.ray.executor import RayExecutor
    from graphrl.runner import run_experiment

    program, plan = compiled(exp, staleness, gpus)
    opts = gr.RunOptions(iterations=steps, seed=seed, quiet=True, staleness=staleness)
    ex = RayExecutor(program, plan, seed=seed, timeout_s=600.0,
                     env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        summary = run_experiment(exp, opts, out=io.StringIO(), executor=ex)
    finally:
        ex.close()
    counted = {r["iteration"] for r in summary.rows[1:]}
    if calls is not None:
        for it in counted:
            per: dict[str, list[float]] = {}
            for e in summary.events:
                if e.iteration == it and e.worker != "host":
                    per.setdefault(e.call, []).append(e.end - e.start)
            for call, xs in per.items():
                ranks = len({e.worker for e in summary.events
                             if e.iteration == it and e.call == call})
                calls.setdefault(call, []).append(sum(xs) / max(ranks, 1))
    return [r["step_seconds"] for r in summary.rows[1:]]


def run(steps: int, rounds: int, batch: int, response_len: int, out: Path | None,
        gpus: int = 2, context: int = 0) -> dict:
    from graphrl.backends.ray.cluster import start_ray

    exp = experiment(batch, response_len, context)
    cut = compiled(exp, 1, gpus)[1].graph.node("%rollout").attr("stream_cut")
    load0 = os.getloadavg()[0]
    session = start_ray(num_gpus=gpus, num_cpus=gpus, memory_monitor=False)
    times: dict[int, list[float]] = {0: [], 1: []}
    calls: dict[int, dict[str, list[float]]] = {0: {}, 1: {}}
    t0 = time.perf_counter()
    try:
        for r in range(rounds):
            for k in (0, 1) if r % 2 == 0 else (1, 0):
                times[k] += measure(exp, k, steps, gpus, calls=calls[k])
                print(f"round {r} staleness {k}: median "
                      f"{statistics.median(times[k]):.3f} s over {len(times[k])} steps",
                      flush=True)
    finally:
        session.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}   # least disturbed by other load (timeit)
    result = {"sync_median_s": med[0], "async_median_s": med[1],
              "speedup": med[0] / med[1], "sync_min_s": best[0], "async_min_s": best[1],
              "speedup_min": best[0] / best[1], "steps_each": len(times[0]),
              "wall_s": time.perf_counter() - t0}
    print(result)
    if out is not None:
        cmd = " ".join(["python benchmarks/async_ray.py", *sys.argv[1:]])
        out.write_text("\n".join([
            "# Asynchronous steps on Ray: measured step time", "",
            f"Generated by `{cmd}` on {platform.machine()}, {os.cpu_count()} CPU cores "
            f"(shared machine; load average {load0:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end), {result['wall_s']:.0f} s.", "",
            f"GRPO example, batch {batch} prompts x 4 samples, {response_len} new tokens"
            f"{f' (models with {context} positions)' if context else ''}; "
            f"1x{gpus}xcpu Ray cluster (fake GPUs, one thread per rank), {LAYOUT[gpus]}; "
            f"async generation streamed with stream_cut={cut} (the compiler's pick). Median of "
            f"{len(times[0])} trained steps each (first trained step of each run dropped), "
            f"{rounds} interleaved rounds.", "",
            "| step | median seconds | fastest step, seconds |", "|---|---:|---:|",
            f"| synchronous (staleness 0) | {med[0]:.3f} | {best[0]:.3f} |",
            f"| asynchronous (staleness 1) | {med[1]:.3f} | {best[1]:.3f} |", "",
            f"Measured speedup of the async step: {result['speedup']:.2f}x in median, "
            f"{result['speedup_min']:.2f}x in fastest step.", "",
            "Where the time goes: median seconds per counted step of each call (on a "
            "rank; generation's are the head, the weight push the generation rank waits "
            "in, and the tail):", "",
            "| call | synchronous | asynchronous |", "|---|---:|---:|",
            *[f"| {c} | {_med(calls[0].get(c))} | {_med(calls[1].get(c))} |"
              for c in sorted(set(calls[0]) | set(calls[1]))], "",
            f"The {gpus} rank processes (one thread each) and the driver share the "
            f"machine's {os.cpu_count()} cores with other work (the load average above), "
            "so the two pools are not independent hardware: run side by side, "
            "generation and the training pool's calls each take longer than alone, and "
            "the spread between steps is large. The async step is bounded below by the "
            "longer of generation and the training pool's calls; the synchronous step is "
            "their sum.", "",
            "All step times (s): sync " + ", ".join(f"{x:.3f}" for x in times[0])
            + "; async " + ", ".join(f"{x:.3f}" for x in times[1]) + ".", ""]))
        print(f"wrote {out}")
    return result


def _med(xs: list[float] | None) -> str:
    return f"{statistics.median(xs):.3f}" if xs else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="async_ray.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="trained steps per run (default 6)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--batch", type=int, default=16, help="prompts per step (default 16)")
    p.add_argument("--response-len", type=int, default=24, help="new tokens (default 24)")
    p.add_argument("--context", type=int, default=0,
                   help="positions of the tiny models (default: the example's 64)")
    p.add_argument("--gpus", type=int, choices=sorted(POOLS), default=2,
                   help="fake GPUs: 2 (generation | rest) or 4 (0-1 | 2-3); default 2")
    p.add_argument("--out", default=str(DEFAULT_OUT), metavar="FILE.md")
    ns = p.parse_args(argv)
    run(ns.steps, ns.rounds, ns.batch, ns.response_len, Path(ns.out) if ns.out else None,
        ns.gpus, ns.context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
