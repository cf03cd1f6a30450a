"""The `graphrl` command line.

    graphrl run EXAMPLE.py [--iterations N --seed S --metrics FILE --trace FILE --device D]
                [--run-dir DIR --logger jsonl,tensorboard,wandb]
    graphrl run --config DIR/config.json [options]   rerun a recorded run
                [--backend ray --cluster 1x4xcpu --policy auto --placement FILE --address A]
    graphrl show EXAMPLE.py|plan.json  print the traced graph, or a saved plan
    graphrl show --simulate plan.json [--json]   its predicted step beside its simulation
    graphrl compile EXAMPLE.py --cluster 4x8xH100 --policy auto --dump DIR
    graphrl compare EXAMPLE.py --cluster 4x8xH100 [--json]
    graphrl estimate --model-config CONFIG.json --phase train ...   the cost model
    graphrl plot METRICS.jsonl [-o curves.png]      reward, KL, lengths, seconds per call
    graphrl check-model DIR [--engine E --precision P --json]   every engine vs HF's module
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ..example_file import load_example
from ..experiment import Experiment, RunOptions
from .error_report import ArgumentParser, guarded, split_debug
from .run_args import add_run_options, run_options

DESCRIPTION = """graphrl: trace an RLHF step (PPO, GRPO) into a dataflow graph, compile it
and run it. An EXAMPLE is a Python file defining build(options) -> Experiment, such as
examples/ppo.py and examples/grpo.py. `graphrl run/show/compile/compare EXAMPLE.py`
executes EXAMPLE.py as Python: run only files you trust. --debug (anywhere) prints full
tracebacks."""


def _run(ns: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..runner import run_experiment

    if ns.config:
        from .run_config import given_dests, rerun

        return rerun(ns, given_dests(ns.parser, ns.argv))
    if not ns.example:
        raise UsageError("graphrl run: name an EXAMPLE.py to run, or --config "
                         "DIR/config.json to rerun a recorded run")
    build = load_example(ns.example)
    run_experiment(build(run_options(ns)), run_options(ns), source=ns.example)
    return 0


def _show(ns: argparse.Namespace) -> int:
    if ns.simulate or ns.json:
        return _show_simulated(ns)
    if ns.example.endswith(".json"):
        from ..dump import plan_text
        from ..plan_file import load_plan

        print(plan_text(load_plan(ns.example)), end="")
        return 0
    build = load_example(ns.example)
    opts = run_options(ns)
    print(build(opts).program(opts.staleness).graph.text(), end="")
    return 0


def _show_simulated(ns: argparse.Namespace) -> int:
    """`show --simulate plan.json`: the saved plan's instruction streams simulated again
    (graphrl/simulate.py) beside the step it predicts; exit 1 where they differ."""
    import json

    from ..errors import UsageError
    from ..plan_file import load_plan
    from ..simulate import simulate

    if not ns.simulate or not ns.example.endswith(".json"):
        raise UsageError(f"graphrl show {ns.example}: --json goes with --simulate, which "
                         "takes a plan.json (written by compile --dump)")
    plan = load_plan(ns.example)
    predicted, simulated = plan.predicted_step_seconds, simulate(plan)[1]
    if ns.json:
        print(json.dumps({"predicted_step_seconds": predicted,
                          "simulated_step_seconds": simulated}))
    else:
        print(f"predicted step {predicted:.6f} s, its instructions simulated {simulated:.6f} s")
    same = abs(predicted - simulated) <= 1e-9 * max(abs(predicted), abs(simulated))
    if not same:
        print(f"graphrl show: {ns.example}: the plan's predicted step differs from the "
              "simulation of its instructions", file=sys.stderr)
    return 0 if same else 1


def _compile(ns: argparse.Namespace) -> int:
    from .compile import compile_main

    return compile_main(ns, load_example(ns.example))


def _lower(ns: argparse.Namespace) -> int:
    from .lower import lower_main

    return lower_main(ns)


def _compare(ns: argparse.Namespace) -> int:
    from .compile import compare_main

    return compare_main(ns, load_example(ns.example))


def _plot(ns: argparse.Namespace) -> int:
    from ..plot import plot_metrics

    print(f"graphrl plot: wrote {plot_metrics(ns.metrics, ns.output)}")
    return 0


def _estimate(argv: Sequence[str]) -> int:
    from .estimate import main as estimate_main

    return estimate_main(list(argv))


def _check_model(ns: argparse.Namespace) -> int:
    from .check_model import check_model_main

    return check_model_main(ns)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="graphrl", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="run an example's RL loop (local or Ray backend)",
                         description="Run EXAMPLE for N iterations with a progress bar, "
                                     "then print a summary (reward first/last 5, seconds "
                                     "per call; on Ray, predicted vs measured seconds per "
                                     "call and reshard bytes); or rerun a recorded run "
                                     "(--config DIR/config.json, docs/run_dir.md). "
                                     "EXAMPLE.py is executed as Python: run only files "
                                     "you trust.")
    run.add_argument("example", metavar="EXAMPLE.py", nargs="?")
    run.add_argument("--config", metavar="CONFIG.json",
                     help="rerun the run a --run-dir recorded (DIR/config.json): its example "
                          "and options; options given beside it replace the recorded ones "
                          "(--overwrite and --resume are never carried over); refused when "
                          "the example, a model's config.json or a data file changed since")
    add_run_options(run)
    run.set_defaults(func=_run, parser=run)
    show = sub.add_parser("show", help="print an example's traced graph, or a saved plan",
                          description="Trace EXAMPLE's step and print its canonical text "
                                      "form, or print a plan.json written by compile --dump.")
    show.add_argument("example", metavar="EXAMPLE.py|plan.json")
    show.add_argument("--simulate", action="store_true",
                      help="with plan.json: simulate its instruction streams again and print "
                           "that step beside the plan's predicted step (exit 1 if they differ)")
    show.add_argument("--json", action="store_true",
                      help="with --simulate: print {predicted_step_seconds, "
                           "simulated_step_seconds}")
    add_run_options(show, backend=False)
    show.set_defaults(func=_show)
    from .compile import POLICY_NAMES, add_compile_options

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
    comp.add_argument("--pipeline", metavar="SPEC", default=None,
                      help="the pass pipeline, e.g. 'assign-devices{policy=auto},"
                           "choose-overlap,insert-reshard{exact=true},lower' (printed by "
                           "every compile; default: that with --policy)")
    add_compile_options(comp)
    add_run_options(comp, backend=False)
    comp.set_defaults(func=_compile)
    from .lower import DESCRIPTION as LOWER_DESCRIPTION, add_arguments as add_lower

    low = sub.add_parser("lower", help="lower a placed graph's text (a compile dump, perhaps "
                                       "edited) to its plan", description=LOWER_DESCRIPTION)
    add_lower(low)
    low.set_defaults(func=_lower)
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
    from .check_model import DESCRIPTION as CHECK_DESCRIPTION, add_arguments

    check = sub.add_parser("check-model", help="check every engine against Hugging Face's "
                                               "own module on a local checkpoint",
                           description=CHECK_DESCRIPTION)
    add_arguments(check)
    check.set_defaults(func=_check_model)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["estimate"]:
        return guarded(lambda: _estimate(argv[1:]), debug=debug)
    p = parser()
    return guarded(lambda: _dispatch(p, argv), debug=debug)


def _dispatch(p: argparse.ArgumentParser, argv: list[str]) -> int:
    ns = p.parse_args(argv)
    ns.argv = argv[1:]   # after the command's name
    return ns.func(ns)


def example_main(build: Callable[[RunOptions], Experiment],
                 argv: Sequence[str] | None = None) -> int:
    """Entry point of `python examples/NAME.py [run options]`."""
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    p = ArgumentParser(description=(build.__doc__ or "").strip() or None)
    add_run_options(p)

    def go() -> int:
        from ..runner import run_experiment

        ns = p.parse_args(argv)
        module = sys.modules.get(getattr(build, "__module__", ""))
        run_experiment(build(run_options(ns)), run_options(ns),
                       source=getattr(module, "__file__", None))
        return 0
    return guarded(go, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
