"""Per call of a Ray run: the engine and degrees the plan names and those the ranks ran,
read back from the run's measured trace (each call's `ran` field), as a markdown table
(docs/engines.md):

    python benchmarks/engine_table.py --placement P.json --cluster 1x4xcpu \
        --iterations 3 --batch-size 8 --trace /tmp/trace.json

runs `graphrl run EXAMPLE --backend ray` with those options (the example's own reward-
model pre-training included), compiles the same plan again (graphrl/launch.py
compile_for: the plan that run executed), and prints one row per call: its mesh, the
planned engine and strategy, what its ranks ran (every rank, every iteration: one row
per distinct report), and whether they agree (graphrl.engines.degree_mismatches).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def table(plan, models, trace: str) -> str:
    from graphrl.engines import (degree_mismatches, parse_degrees, planned_degrees,
                                 resolve_engines)
    from graphrl.timeline import read_chrome_trace

    resolved = resolve_engines(plan.graph, models)
    ran: dict[str, dict[str, set]] = {}
    for e in read_chrome_trace(trace):
        if e.ran:
            ran.setdefault(e.node, {}).setdefault(e.ran, set()).add((e.worker, e.iteration))
    rows = ["| call | mesh | planned engine | planned strategy | ran (ranks x iterations) "
            "| agree |", "|---|---|---|---|---|---|"]
    for n in plan.graph.nodes:
        if n.name not in resolved:
            continue
        planned = planned_degrees(resolved[n.name], n.target, n.placement.strategy,
                                  precision=plan.graph.model(n.model).spec.dtype)
        for text, where in sorted(ran.get(n.name, {"(did not run)": set()}).items()):
            ranks = len({w for w, _ in where})
            its = len({i for _, i in where})
            bad = degree_mismatches(n.target, planned, parse_degrees(text)) if where else ["-"]
            rows.append(f"| {n.call} | {n.placement.mesh.text()} | {resolved[n.name]} | "
                        f"{n.placement.strategy.text()} | {text} ({ranks} x {its}) | "
                        f"{'yes' if not bad else 'NO: ' + ', '.join(bad)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", default=str(ROOT / "examples" / "ppo.py"))
    ap.add_argument("--placement", required=True)
    ap.add_argument("--cluster", default="1x4xcpu")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace", required=True)
    a = ap.parse_args(argv)
    from graphrl.launch import compile_for
    from graphrl.cli import load_example, main as cli
    from graphrl.experiment import RunOptions

    args = ["run", a.example, "--backend", "ray", "--cluster", a.cluster, "--placement",
            a.placement, "--iterations", str(a.iterations), "--batch-size",
            str(a.batch_size), "--seed", str(a.seed), "--trace", a.trace, "--overwrite"]
    rc = cli(args)
    if rc:
        return rc
    opts = RunOptions(cluster=a.cluster, placement=a.placement, batch_size=a.batch_size,
                      seed=a.seed)
    program = load_example(a.example)(opts).program()
    plan = compile_for(program, opts)
    print(table(plan, {k: m.engine for k, m in program.models.items()}, a.trace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
