"""The `graphrl` command line.

    graphrl run EXAMPLE.py [--iterations N --seed S --metrics FILE --trace FILE --device D]
                [--backend ray --cluster 1x4xcpu --policy auto --placement FILE --address A]
    graphrl show EXAMPLE.py|plan.json  print the traced graph, or a saved plan
    graphrl compile EXAMPLE.py --cluster 4x8xH100 --policy auto --dump DIR
    graphrl compare EXAMPLE.py --cluster 4x8xH100 [--json]
    graphrl estimate --model-config CONFIG.json --phase train ...   the cost model
    graphrl plot METRICS.jsonl [-o curves.png]      reward, KL, lengths, seconds per call
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import GraphRLError, UsageError
from .experiment import Experiment, RunOptions, add_run_options, run_options

DESCRIPTION = """graphrl: trace an RLHF step (PPO, GRPO) into a dataflow graph, compile it
and run it. An EXAMPLE is a Python file defining build(options) -> Experiment, such as
examples/ppo.py and examples/grpo.py."""


def load_example(path: str) -> Callable[[RunOptions], Experiment]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"no such example file: {path}")
    spec = importlib.util.spec_from_file_location(f"graphrl_example_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build = getattr(module, "build", None)
    if not callable(build):
        raise UsageError(f"{path} defines no build(options) -> Experiment function")
    return build


def _run(ns: argparse.Namespace) -> int:
    from .runner import run_experiment

    build = load_example(ns.example)
    run_experiment(build(run_options(ns)), run_options(ns))
    return 0


def _show(ns: argparse.Namespace) -> int:
    if ns.example.endswith(".json"):
        from .dump import plan_text
        from .plan import Plan

        try:
            plan = Plan.from_json(Path(ns.example).read_text())
        except OSError as e:
            raise UsageError(f"{ns.example}: {e.strerror}") from None
        except (ValueError, KeyError) as e:
            raise UsageError(f"{ns.example} is not a graphrl plan: {e}") from None
        print(plan_text(plan), end="")
        return 0
    build = load_example(ns.example)
    print(build(run_options(ns)).program().graph.text(), end="")
    return 0


def _compile(ns: argparse.Namespace) -> int:
    from .compile_cli import compile_main

    return compile_main(ns, load_example(ns.example))


def _compare(ns: argparse.Namespace) -> int:
    from .compile_cli import compare_main

    return compare_main(ns, load_example(ns.example))


def _plot(ns: argparse.Namespace) -> int:
    from .plot import plot_metrics

    print(f"graphrl plot: wrote {plot_metrics(ns.metrics, ns.output)}")
    return 0


def _estimate(argv: Sequence[str]) -> int:
    from .estimate import main as estimate_main

    return estimate_main(list(argv))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphrl", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="run an example's RL loop (local or Ray backend)",
                         description="Run EXAMPLE for N iterations with a progress bar, "
                                     "then print a summary (reward first/last 5, seconds "
                                     "per call; on Ray, predicted vs measured seconds per "
                                     "call and reshard bytes).")
    run.add_argument("example", metavar="EXAMPLE.py")
    add_run_options(run)
    run.set_defaults(func=_run)
    show = sub.add_parser("show", help="print an example's traced graph, or a saved plan",
                          description="Trace EXAMPLE's step and print its canonical text "
                                      "form, or print a plan.json written by compile --dump.")
    show.add_argument("example", metavar="EXAMPLE.py|plan.json")
    add_run_options(show, backend=False)
    show.set_defaults(func=_show)
    from .compile_cli import POLICY_NAMES, add_compile_options

    comp = sub.add_parser("compile", help="place, schedule and reshard a step for a cluster",
                          description="Compile EXAMPLE's step for a cluster: print a table "
                                      "(call, mesh, strategy, predicted seconds, peak memory) "
                                      "and the predicted step time; --dump DIR writes the "
                                      "numbered pass dumps, plan.txt/json/dot, trace.json and "
                                      "gantt.png/svg.")
    comp.add_argument("example", metavar="EXAMPLE.py")
    comp.add_argument("--policy", default="auto", choices=POLICY_NAMES,
                      help="placement policy (default auto)")
    comp.add_argument("--dump", metavar="DIR", help="write dumps into DIR")
    add_compile_options(comp)
    add_run_options(comp, backend=False)
    comp.set_defaults(func=_compile)
    cmp = sub.add_parser("compare", help="every placement policy side by side",
                         description="Compile EXAMPLE with every policy and print the "
                                     "predicted step times and auto's speedup over each.")
    cmp.add_argument("example", metavar="EXAMPLE.py")
    cmp.add_argument("--json", action="store_true", help="print a JSON list instead")
    add_compile_options(cmp)
    add_run_options(cmp, backend=False)
    cmp.set_defaults(func=_compare)
    sub.add_parser("estimate", help="predict seconds and memory of one call (cost model)",
                   add_help=False)
    plot = sub.add_parser("plot", help="draw a run's metrics (reward, KL, response length, "
                                       "seconds per call)",
                          description="Draw the curves of a --metrics file over iterations "
                                      "into a PNG (default: the metrics path with .png).")
    plot.add_argument("metrics", metavar="METRICS.jsonl")
    plot.add_argument("-o", "--output", metavar="PNG", help="picture to write")
    plot.set_defaults(func=_plot)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["estimate"]:
        return _guarded(lambda: _estimate(argv[1:]))
    p = parser()
    ns = p.parse_args(argv)
    return _guarded(lambda: ns.func(ns), p)


def example_main(build: Callable[[RunOptions], Experiment],
                 argv: Sequence[str] | None = None) -> int:
    """Entry point of `python examples/NAME.py [run options]`."""
    p = argparse.ArgumentParser(description=(build.__doc__ or "").strip() or None)
    add_run_options(p)
    ns = p.parse_args(argv)

    def go() -> int:
        from .runner import run_experiment

        run_experiment(build(run_options(ns)), run_options(ns))
        return 0
    return _guarded(go, p)


def _guarded(fn: Callable[[], Any], p: argparse.ArgumentParser | None = None) -> int:
    """graphrl errors become one clear line (exit 2 for usage, 1 otherwise); Ctrl-C 130."""
    try:
        return int(fn() or 0)
    except UsageError as e:
        if p is not None:
            p.print_usage(sys.stderr)
        print(f"graphrl: error: {e}", file=sys.stderr)
        return 2
    except GraphRLError as e:
        print(f"graphrl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("graphrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
