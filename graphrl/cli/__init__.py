"""The command line (every module here parses arguments; nothing outside imports them):

- `main`         the `graphrl` command: run, show, compile, compare, lower, estimate, plot,
                 check-model; `example_main` for `python examples/NAME.py`.
- `run_args`     the flags of every example run -> graphrl.experiment.RunOptions.
- `compile`      `graphrl compile` / `compare`: placement, dumps, the async report.
- `lower`        `graphrl lower PLACED.txt`: a placed graph's text to its plan.
- `estimate`     `graphrl estimate`: the cost model of one call.
- `check_model`  `graphrl check-model`: every engine against Hugging Face's module.
- `error_report` argparse and errors in graphrl's form (usage errors, --debug).
- `argtypes`     argparse value types (positive ints, seconds).
"""
from .main import example_main, load_example, main

__all__ = ["main", "example_main", "load_example"]
