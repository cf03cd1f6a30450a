"""`graphrl estimate`: the cost model's prediction for one call, from a HF config file.

    graphrl estimate --model-config CONFIG.json --phase forward|train|generate \\
        --batch B --seq S [--new-tokens G] [--gpu H100-80G] [--engine hf|graph] \\
        [--tp T --pp P --dp D] [--zero Z] [--micro-batches M] [--json]

prints the predicted seconds and peak memory per GPU (a short table, or one JSON object
with --json). For --phase generate, --seq is the prompt length and --new-tokens the
number of generated tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..cluster import GPU_TYPES, gpu_type
from ..cost import ENGINES, PHASES, CallCost, estimate
from ..errors import UsageError
from ..parallel import Strategy
from ..types import HEADS, ModelSpec
from .argtypes import int_at_least
from .error_report import ArgumentParser

PROG = "graphrl estimate"


_positive = int_at_least(1)
_non_negative = int_at_least(0)


def _gpu(text: str) -> str:
    try:
        return gpu_type(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG, description="Predict seconds and peak memory per GPU of one model call "
                               "with graphrl's analytic cost model (graphrl.cost).")
    p.add_argument("--model-config", required=True, metavar="CONFIG.json",
                   help="a Hugging Face config.json (llama/mistral/qwen2 or gpt2 shaped)")
    p.add_argument("--phase", required=True, choices=PHASES)
    p.add_argument("--batch", required=True, type=_positive, help="sequences in the call")
    p.add_argument("--seq", required=True, type=_positive,
                   help="tokens per sequence (the prompt length for generate)")
    p.add_argument("--new-tokens", type=_non_negative, default=None,
                   help="tokens generated per sequence (generate only; required there)")
    p.add_argument("--gpu", type=_gpu, default="H100-80G",
                   help=f"GPU preset: {', '.join(GPU_TYPES)} (aliases H100, A100; "
                        "default H100-80G)")
    p.add_argument("--engine", choices=ENGINES, default="hf",
                   help="generate engine: hf = eager HF generate, graph = CUDA-graph engine "
                        "(vLLM/SGLang class); default hf")
    p.add_argument("--head", choices=HEADS, default="lm",
                   help="model head: lm (default), value (critic) or score (reward)")
    p.add_argument("--tp", type=_positive, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=_positive, default=1, help="pipeline stages")
    p.add_argument("--dp", type=_positive, default=1, help="data-parallel replicas")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage")
    p.add_argument("--micro-batches", type=_positive, default=1)
    p.add_argument("--gpus-per-node", type=_positive, default=8,
                   help="GPUs per node (decides NVLink vs network for groups); default 8")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _load_spec(path: str, head: str) -> ModelSpec:
    from ..model_config import load_hf_config

    return ModelSpec.from_hf_config(load_hf_config(path), head=head)


def result_dict(spec: ModelSpec, args: argparse.Namespace, strategy: Strategy,
                cost: CallCost) -> dict[str, Any]:
    from graphrl.passes.search import DEFAULT_HEADROOM   # what compile leaves free

    gpu = gpu_type(args.gpu)
    out: dict[str, Any] = {
        "seconds": cost.seconds,
        "peak_memory_bytes": cost.peak_memory_bytes,
        "peak_memory_gib": cost.peak_memory_gib,
        "fits": cost.fits(gpu, DEFAULT_HEADROOM),
        "gpu": gpu.name,
        "gpu_memory_gib": gpu.memory_gib,
        "headroom": DEFAULT_HEADROOM,
        "phase": args.phase,
        "batch": args.batch,
        "seq": args.seq,
        "strategy": strategy.text(),
        "model": spec.text(),
        "num_params": spec.num_params,
        "breakdown": dict(cost.breakdown),
    }
    if args.phase == "generate":
        out["new_tokens"] = args.new_tokens
        out["engine"] = args.engine
    return out


def table_text(result: dict[str, Any]) -> str:
    lines = [
        f"model      {result['model']}",
        f"call       {result['phase']} batch={result['batch']} seq={result['seq']}"
        + (f" new_tokens={result['new_tokens']} engine={result['engine']}"
           if result["phase"] == "generate" else ""),
        f"strategy   {result['strategy']} on {result['gpu']}",
        f"time       {result['seconds']:.4g} s",
        f"memory     {result['peak_memory_gib']:.2f} GiB per GPU "
        f"({'fits' if result['fits'] else 'does NOT fit'} in "
        f"{result['gpu_memory_gib'] * (1 - result['headroom']):.2f} GiB: "
        f"{result['gpu_memory_gib']:.0f} GiB less the {result['headroom']:.0%} headroom "
        "compile keeps free)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 with usage and one `graphrl: error:` line for bad input."""
    from .error_report import guarded

    p = parser()
    return guarded(lambda: _main(p, argv))


def _main(p: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = p.parse_args(argv)
    if args.phase == "generate" and not args.new_tokens:
        p.error("--phase generate needs --new-tokens >= 1")
    if args.phase != "generate" and args.new_tokens:
        p.error("--new-tokens applies to --phase generate only")
    try:
        strategy = Strategy(dp=args.dp, tp=args.tp, pp=args.pp,
                            micro_batches=args.micro_batches, zero=args.zero)
        spec = _load_spec(args.model_config, args.head)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_strategy(spec, strategy)
    if args.dp * args.micro_batches > args.batch:
        raise UsageError(f"--batch {args.batch} is fewer sequences than --dp {args.dp} x "
                         f"--micro-batches {args.micro_batches} (each micro-batch of each "
                         "replica needs one at least)")
    tokens = args.seq + (args.new_tokens or 0)
    if tokens > spec.max_positions:
        new = f" + --new-tokens {args.new_tokens}" if args.new_tokens else ""
        raise UsageError(f"--seq {args.seq}{new} = {tokens} tokens exceeds the model's "
                         f"context of {spec.max_positions} (max_position_embeddings in its "
                         "config)")
    try:
        cost = estimate(spec, args.phase, args.batch, args.seq, strategy, gpu_type(args.gpu),
                        new_tokens=args.new_tokens or 0, engine=args.engine,
                        gpus_per_node=args.gpus_per_node)
    except ValueError as e:
        raise UsageError(str(e)) from None
    result = result_dict(spec, args, strategy, cost)
    print(json.dumps(result, indent=2) if args.json else table_text(result))
    return 0


def check_strategy(spec: ModelSpec, strategy: Strategy) -> None:
    """Degrees the model's shape allows: tp divides the attention heads (and the KV heads,
    Megatron-LM's GQA split), pp at most the layers."""
    if spec.num_heads % strategy.tp:
        raise UsageError(f"--tp {strategy.tp} does not divide the model's "
                         f"{spec.num_heads} attention heads")
    if spec.num_kv_heads % strategy.tp and strategy.tp % spec.num_kv_heads:
        raise UsageError(f"--tp {strategy.tp} and the model's {spec.num_kv_heads} key/value "
                         "heads: one must divide the other")
    if strategy.pp > spec.num_layers:
        raise UsageError(f"--pp {strategy.pp} exceeds the model's {spec.num_layers} layers")


if __name__ == "__main__":
    sys.exit(main())
