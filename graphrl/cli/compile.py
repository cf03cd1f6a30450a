"""`graphrl compile` and `graphrl compare`: plan an example's step for a cluster."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..placement_file import POLICY_NAMES, cluster_of, gen_engine, load_placement

__all__ = ["POLICY_NAMES", "add_compile_options", "compile_main", "compare_main",
           "compare_rows", "cluster_of", "gen_engine", "load_placement"]



def add_compile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, metavar="NxGxTYPE",
                   help="nodes x GPUs per node x GPU type, e.g. 4x8xH100 (types: A100-80G, "
                        "H100-80G, H200, cpu)")
    p.add_argument("--gen-engine", choices=("hf", "graph"), default=None,
                   help="generation engine the cost model assumes: hf (eager Hugging Face "
                        "generate) or graph (CUDA-graph captured, vLLM/SGLang class); "
                        "default: graph for --model-size plans, else hf")
    p.add_argument("--response-lengths", metavar="DIST", default=None,
                   help="response-length distribution generation is priced over: fixed:N, "
                        "lognormal:mean=M,max=X[,sigma=S] or empirical:FILE (one length a "
                        "line); sets --response-len to its max unless given; default: every "
                        "response --response-len long")
    p.add_argument("--memory-headroom", metavar="FRACTION", type=float, default=None,
                   help="share of each GPU's memory (and each node's host RAM) plans leave "
                        "free; default 0.08")
    p.add_argument("--placement", metavar="FILE",
                   help="pin calls: YAML or JSON, one entry per call, e.g. "
                        "'policy.train: {gpus: \"0-15\", dp: 16, zero: 3}'")


def format_table(compiled: Any) -> str:
    """call | mesh | strategy | predicted seconds | peak memory per GPU."""
    rows = [("call", "mesh", "strategy", "start s", "seconds", "peak GiB")]
    for n in compiled.graph.calls():
        t = n.timing
        if n.placement is None or t is None:
            continue
        rows.append((n.call, n.placement.mesh.text(), n.placement.strategy.text(),
                     f"{t.start:.2f}", f"{t.seconds:.2f}", f"{t.peak_bytes / 2**30:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def response_lengths(ns: argparse.Namespace) -> Any:
    """The parsed --response-lengths (None if absent); a --response-len left unset
    becomes the distribution's max."""
    from ..lengths import parse

    if not getattr(ns, "response_lengths", None):
        return None
    dist = parse(ns.response_lengths)
    if getattr(ns, "response_len", None) is None:
        ns.response_len = dist.max_len
    return dist


def spread_lines(compiled: Any, lengths: Any) -> list[str]:
    """p50 / p90 of each generate call's predicted seconds over sampled length draws."""
    from ..serving import SPREAD_DRAWS, generation_spread

    ev, problem = compiled.evaluation, compiled.problem
    out = []
    for s in ev.schedule:
        c = problem.by_name[s.name]
        if c.phase != "generate" or s.choice is None:
            continue
        p50, p90 = generation_spread(problem.specs[c.model], c.batch, c.seq, c.new_tokens,
                                     s.choice.strategy, problem.cluster.gpu,
                                     problem.gen_engine, lengths=lengths,
                                     params=problem.params,
                                     gpus_per_node=problem.cluster.gpus_per_node)
        out.append(f"{c.call}: {s.choice.seconds:.2f} s priced, p50 {p50:.2f} s, p90 "
                   f"{p90:.2f} s over {SPREAD_DRAWS} length draws")
    return out


def compile_main(ns: argparse.Namespace, build: Any) -> int:
    from ..compiler import compile_graph
    from ..evaluation import describe as describe_evaluation
    from .run_args import run_options
    from ..progress import Progress
    from ..sampling import oversampling_lines

    from ..outputs import check_output_dir

    if ns.dump:  # before compiling: say now, not after the search, that DIR is unusable
        check_output_dir("--dump", ns.dump)
    lengths = response_lengths(ns)
    opts = run_options(ns)
    graph = build(opts).program().graph
    dump = Path(ns.dump) if ns.dump else None
    progress = Progress("graphrl compile")
    compiled = compile_graph(graph, cluster_of(ns.cluster), ns.policy,
                             placement=load_placement(ns.placement),
                             gen_engine=gen_engine(ns.gen_engine, opts.planning_only),
                             dump_dir=dump, engines=not opts.planning_only,
                             response_lengths=lengths, memory_headroom=ns.memory_headroom,
                             progress=progress, staleness=opts.staleness,
                             pipeline=getattr(ns, "pipeline", None))
    progress.done()
    plan = compiled.plan
    print(f"graphrl compile: @{graph.name} on {plan.cluster.text()}, policy {plan.policy}")
    print(format_table(compiled))
    notes = {}
    for key, value in plan.notes:   # the first of each key: an async plan's later
        notes.setdefault(key, value)   # ("stream", line) notes describe its head part
    print(f"predicted step: {plan.predicted_step_seconds:.3f} s   (streaming x{notes['stream']}, "
          f"offloaded GPUs: {notes['offloaded_gpus']}, compile {compiled.compile_seconds:.2f} s)")
    print(f"pipeline: {compiled.pipeline}")
    for line in describe_evaluation(plan.graph):
        print(line)
    for line in oversampling_lines(graph):   # dynamic sampling (graphrl/sampling.py)
        print(line)
    if opts.staleness:
        print(async_line(compiled.findings))
    if lengths is not None:
        print(f"response lengths {lengths.text()}; generation " + "; ".join(
            spread_lines(compiled, lengths)))
    if dump is not None:
        from ..dump import write_dumps

        paths = write_dumps(plan, dump)
        print(f"dumps: {dump}/ ({', '.join(sorted(Path(p).name for p in paths))} and the "
              "numbered pass dumps)")
    return 0


def async_line(findings: Any) -> str:
    """What --staleness K decided (graphrl.async_report.AsyncReport): the best async
    plan, its step against the synchronous one and why it lost or could not run; where
    async runs, the stream cut and the calls that start on the head part."""
    report = findings["async_report"]
    lines = report.lines()
    stream = report.stream if report.staleness else None
    if stream is not None:
        lines.append(f"  generation streamed, cut at {stream.cut} tokens: head "
                     f"{stream.phases.head:.2f} s + push + tail {stream.phases.tail:.2f} s")
    if report.staleness and report.stream_split is not None:
        lines += report.stream_split.lines()
    return "\n".join(lines)


def compare_rows(graph: Any, cluster: Any, engine: str,
                 placement: dict[str, Any] | None = None,
                 lengths: Any = None, headroom: float | None = None,
                 progress: Any = None, staleness: int = 0) -> list[dict[str, Any]]:
    from ..compiler import compile_graph
    from ..errors import GraphRLError

    rows = []
    for policy in POLICY_NAMES:
        told = (None if progress is None else
                lambda stage, n, policy=policy: progress(f"{policy}, {stage}", n))
        try:
            c = compile_graph(graph, cluster, policy, placement=placement, gen_engine=engine,
                              engines=False,   # comparing placements, not running them
                              response_lengths=lengths, memory_headroom=headroom,
                              progress=told)
            rows.append({"policy": policy, "mode": "sync", "staleness": 0, "feasible": True,
                         "step_seconds": c.plan.predicted_step_seconds,
                         "compile_seconds": c.compile_seconds, "error": ""})
        except GraphRLError as e:
            rows.append({"policy": policy, "mode": "sync", "staleness": 0, "feasible": False,
                         "step_seconds": None, "compile_seconds": None,
                         "error": str(e).splitlines()[0]})
    if staleness:
        rows.insert(1, async_row(graph, cluster, engine, lengths, headroom, staleness))
    chosen = [r["step_seconds"] for r in rows if r["policy"] == "auto" and r["feasible"]
              and (r["mode"] == "sync" or r["chosen"])]
    auto = min(chosen, default=None)
    for r in rows:
        r["auto_speedup"] = (r["step_seconds"] / auto if auto and r["step_seconds"] else None)
    return rows


def async_row(graph: Any, cluster: Any, engine: str, lengths: Any, headroom: Any,
              staleness: int) -> dict[str, Any]:
    """auto's asynchronous row under staleness <= K: the best async plan's lowered step,
    staleness and pools, whether auto chose it (else why it lost), its lower bound."""
    from ..compiler import compile_graph
    from ..errors import GraphRLError

    base = {"policy": "auto", "mode": "async", "chosen": False, "compile_seconds": None,
            "async_bound": None, "split": "", "head_part": None}
    try:
        c = compile_graph(graph, cluster, "auto", gen_engine=engine, engines=False,
                          response_lengths=lengths, memory_headroom=headroom,
                          staleness=staleness)
    except GraphRLError as e:
        return {**base, "staleness": staleness, "feasible": False, "step_seconds": None,
                "error": str(e).splitlines()[0]}
    report = c.findings["async_report"]
    plan = report.plan
    if plan is None or report.lowered_seconds is None:
        return {**base, "staleness": staleness, "feasible": False, "step_seconds": None,
                "compile_seconds": c.compile_seconds, "error": report.why}
    return {**base, "staleness": plan.staleness, "feasible": True,
            "chosen": bool(report.staleness),
            "step_seconds": report.lowered_seconds,   # the executable plan's
            "streamed_step_seconds": plan.step_seconds,   # as priced before lowering
            "sync_seconds": report.sync_seconds,
            "async_bound": report.lower_bound, "compile_seconds": c.compile_seconds,
            "split": plan.pools, "head_part": _head_part(report),
            "error": "" if report.staleness else report.why}


def _head_part(report: Any) -> dict[str, Any] | None:
    """A compare row's streamed scoring (graphrl/stream_train.py): the calls that start
    on the head part, those that wait for the whole batch and why."""
    split = report.stream_split
    if split is None:
        return None
    return {"calls": list(split.calls), "waits": dict(split.refused)}


def compare_main(ns: argparse.Namespace, build: Any) -> int:
    from .run_args import run_options
    from ..progress import Progress

    lengths = response_lengths(ns)
    opts = run_options(ns)
    graph = build(opts).program().graph
    cluster = cluster_of(ns.cluster)
    progress = Progress("graphrl compare")
    variants = [("", graph)]
    if opts.lora:   # LoRA beside full fine-tuning of the same models (docs/lora.md)
        from dataclasses import replace

        variants = [("full", build(replace(opts, lora=())).program().graph), ("lora", graph)]
    rows = []
    for tuning, g in variants:
        rows += [{**r, "tuning": tuning} if tuning else r for r in compare_rows(
            g, cluster, gen_engine(ns.gen_engine, opts.planning_only),
            load_placement(ns.placement), lengths, ns.memory_headroom, progress,
            opts.staleness)]
    progress.done()
    if ns.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"graphrl compare: @{graph.name} on {cluster.text()}")
    print(f"{'policy':<18}{'stale':>6}{'step s':>10}{'auto speedup':>14}{'compile s':>11}"
          "  pools")
    for r in rows:
        name = (r["policy"] + (" async" if r.get("mode") == "async" else "")
                + (f" {r['tuning']}" if r.get("tuning") else ""))
        if r["feasible"]:
            compile_s = (f"{r['compile_seconds']:>11.2f}" if r["compile_seconds"] is not None
                         else f"{'-':>11}")
            note = (f"  {r['split']} " + ("(chosen)" if r["chosen"] else
                                          f"(sync kept: {r['error']})")
                    if r.get("mode") == "async" else "")
            print(f"{name:<18}{r['staleness']:>6}{r['step_seconds']:>10.3f}"
                  f"{r['auto_speedup']:>13.2f}x{compile_s}{note}")
        else:
            print(f"{name:<18}{r['staleness']:>6}{'infeasible':>10}   {r['error']}")
    return 0
