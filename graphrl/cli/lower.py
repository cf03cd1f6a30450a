"""`graphrl lower PLACED.txt`: the plan of a placed graph's text (graphrl/lower_placed.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIPTION = ("Lower a placed graph — a numbered dump of assign-devices or a later pass "
               "(graphrl compile --dump DIR), perhaps edited by hand — to its plan. An "
               "unedited dump gives back the compile's plan.json byte for byte; an edited "
               "placement (a mesh, a strategy) is scheduled again and gives the verified "
               "plan of the edit, or an error naming the line.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("placed", metavar="PLACED.txt", help="a placed graph's text")
    p.add_argument("--cluster", metavar="NxGxTYPE", default=None,
                   help="the cluster to lower for; default (and the only one accepted): "
                        "the one the graph's schedule line names")
    p.add_argument("--dump", metavar="DIR", help="write plan.json/txt/dot, trace.json and "
                                                 "gantt.png/svg into DIR")
    p.add_argument("--json", action="store_true",
                   help="print {predicted_step_seconds, simulated_step_seconds, changed}")


def lower_main(ns: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..lower_placed import lower_placed
    from ..outputs import check_output_dir
    from ..placement_file import cluster_of
    from ..simulate import simulate

    path = Path(ns.placed)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{ns.placed}: {e.strerror}") from None
    if ns.dump:
        check_output_dir("--dump", ns.dump)
    cluster = cluster_of(ns.cluster) if ns.cluster else None
    out = lower_placed(text, cluster, where=str(path))
    plan = out.plan
    _, simulated = simulate(plan)
    if ns.json:
        print(json.dumps({"predicted_step_seconds": plan.predicted_step_seconds,
                          "simulated_step_seconds": simulated,
                          "changed": list(out.changed)}))
    else:
        state = ("as compiled" if not out.changed else
                 f"edited: re-scheduled {', '.join(out.changed)}")
        print(f"graphrl lower: @{plan.graph.name} on {plan.cluster.text()}, policy "
              f"{plan.policy} ({state})")
        print(f"predicted step: {plan.predicted_step_seconds:.3f} s (the simulation of its "
              f"instruction streams)")
    if ns.dump:
        from ..dump import write_dumps

        paths = write_dumps(plan, ns.dump)
        if not ns.json:
            print(f"dumps: {ns.dump}/ ({', '.join(sorted(Path(p).name for p in paths))})")
    return 0
