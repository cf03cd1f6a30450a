"""`graphrl check-model DIR`: each engine x strategy against Hugging Face's own module on
a local checkpoint (graphrl.backends.conformance does the work). Exit 0 when every engine
agrees or is refused (a refusal is the truthful answer), 1 on any mismatch beyond
tolerance, 2 for bad input."""
from __future__ import annotations

import argparse
import json

from ..option_checks import MAX_SEED
from .argtypes import int_at_least, positive_int, positive_seconds

DESCRIPTION = """Load the local Hugging Face checkpoint DIR in each engine and strategy and
compare, on a few random prompts (some left-padded), its per-token log-probs with
AutoModelForCausalLM.from_pretrained(DIR) in fp32, and one GRPO optimizer step with the
same step on the one-process hf engine (fast: also its greedy tokens). An engine that does
not implement a feature of the checkpoint is refused, with the reason. Multi-rank engines
run as local gloo processes on CPU. Exit 1 on any mismatch beyond tolerance."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="a local Hugging Face model directory")
    p.add_argument("--engine", action="append", metavar="ENGINE",
                   help="hf, fast, megatron or deepspeed; repeat or comma-separate "
                        "(default: every engine this machine can run)")
    p.add_argument("--tp", type=positive_int, help="megatron tensor-parallel degree "
                                          "(default: tp=2, then pp=2)")
    p.add_argument("--pp", type=positive_int, help="megatron pipeline-parallel degree")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3),
                   help="deepspeed ZeRO stage (default 3)")
    p.add_argument("--dp", type=positive_int,
                   help="deepspeed data-parallel degree (default 2)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="what the engines run in (default bf16, as runs do); the "
                        "reference is always HF's module in fp32")
    p.add_argument("--prompts", type=positive_int, default=4, help="probe rows (default 4)")
    p.add_argument("--seq", type=positive_int, default=16,
                   help="probe tokens per row (default 16)")
    p.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0,
                   help="seed of the probe (default 0)")
    p.add_argument("--timeout", type=positive_seconds, default=600.0, metavar="S",
                   help="seconds the multi-rank engines may take together (default 600)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list, one object per engine and strategy")


def check_model_main(ns: argparse.Namespace) -> int:
    from ..backends.conformance import check_model, strategies

    engines = None
    if ns.engine:
        engines = [e.strip() for arg in ns.engine for e in arg.split(",") if e.strip()]
    plan = None
    if engines is not None or any(v is not None for v in (ns.tp, ns.pp, ns.zero, ns.dp)):
        from ..backends.conformance import available_engines

        plan = strategies(engines or available_engines(), tp=ns.tp, pp=ns.pp,
                          zero=ns.zero, dp=ns.dp)
    results = check_model(ns.directory, plan=plan, precision=ns.precision,
                          prompts=ns.prompts, seq=ns.seq, seed=ns.seed,
                          timeout_s=ns.timeout)
    if ns.json:
        print(json.dumps([r.as_json() for r in results], indent=1))
    else:
        for r in results:
            print(r.line())
    return 1 if any(r.status == "mismatch" for r in results) else 0
