"""LoRA against full fine-tuning of the same policy (docs/lora.md).

Measured (local backend, CPU, one thread): the GRPO example (examples/grpo.py, its tiny
Llama, the reward model trained once and shared), run for --iterations steps with full
fine-tuning and with --lora policy:<SPEC>, alternating the two --repeats times so both
see the same machine load. Per variant: trained parameters (what the optimizer holds,
counted off the engine), the bytes the policy engine keeps after training (weights,
gradients and Adam state, summed over its tensors), the median step and policy.train
seconds (first step excluded), and the mean reward of the first and last 5 steps.

Planned (cost model, 7B and 70B GRPO on one 8xH100 node): feasibility, the predicted
step, the policy.train call's peak bytes per GPU, and the bytes per step the
train-to-generation reshard moves (adapters only under LoRA). The local backend runs in
one process, where the sync is a no-op: a run's reshard bytes are the plan's only.

Generation: merged vs unmerged adapters on one engine (`generation`).

Peak memory: each measured variant runs in a fresh process of its own (`--one`), whose
peak resident set (getrusage ru_maxrss: the Python interpreter, torch and the run's
tensors) is reported as `peak_rss_bytes`, and the reward model is trained anew in each.

    .venv/bin/python benchmarks/lora_vs_full.py --repeats 2 --out docs/lora.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))


def engine_bytes(engine) -> dict[str, int]:
    """Bytes of the policy engine's weights, gradients and optimizer state tensors."""
    import torch

    weights = sum(t.numel() * t.element_size() for t in engine.module.state_dict().values())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters()
                if p.grad is not None)
    optim = sum(v.numel() * v.element_size() for s in (engine.optimizer.state.values()
                                                        if engine.optimizer else ())
                for v in s.values() if torch.is_tensor(v))
    trained = sum(p.numel() for g in engine.optimizer.param_groups for p in g["params"])
    return {"weight_bytes": weights, "grad_bytes": grads, "optimizer_bytes": optim,
            "trained_params": trained}


def measure(lora: str, lr: float, iterations: int, cache: dict) -> dict:
    import graphrl as gr
    from conftest import load_build, shared_prepare
    from graphrl.backends.local import LocalExecutor
    from graphrl.runner import run_experiment

    opts = gr.RunOptions(seed=11, quiet=True, iterations=iterations,
                         lora=(lora,) if lora else ())
    exp = load_build("grpo")(opts)
    exp = replace(exp, models=tuple(replace(m, options={**m.options, "lr": lr})
                                    if m.name == "policy" else m for m in exp.models))
    exp = shared_prepare(exp, cache, opts.seed)
    executor = LocalExecutor(exp.with_precision(opts).program(), seed=opts.seed)
    t = time.perf_counter()
    summary = run_experiment(exp, opts, out=open("/dev/null", "w"), executor=executor)
    rows = summary.rows[1:]
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
    return {"variant": lora or "full", "lr": lr, "seconds": time.perf_counter() - t,
            "peak_rss_bytes": peak,
            "step_seconds": statistics.median(r["step_seconds"] for r in rows),
            "train_seconds": statistics.median(r["seconds/policy.train"] for r in rows),
            "generate_seconds": statistics.median(r["seconds/policy.generate"] for r in rows),
            "reward_first5": summary.reward_window(True),
            "reward_last5": summary.reward_window(False),
            **engine_bytes(executor.engines["policy"])}


def planned(lora: str) -> list[dict]:
    import graphrl as gr
    from conftest import load_build
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph
    from graphrl.errors import GraphRLError

    out = []
    for size in ("7b", "70b"):
        opts = gr.RunOptions(model_size=size, lora=(lora,) if lora else ())
        graph = load_build("grpo")(opts).program().graph
        row = {"variant": lora or "full", "size": size, "cluster": "1x8xH100"}
        try:
            plan = compile_graph(graph, ClusterSpec.parse("1x8xH100"), "auto").plan
        except GraphRLError as e:
            out.append({**row, "feasible": False, "error": str(e).splitlines()[0]})
            continue
        g = plan.graph
        train = next(n for n in g.calls() if n.call == "policy.train")
        reshard = [n for n in g.nodes if n.target == "reshard" and n.model == "policy"]
        out.append({**row, "feasible": True, "step_seconds": plan.predicted_step_seconds,
                    "train_peak_gib": train.timing.peak_bytes / 2**30,
                    "trained_params": g.model("policy").spec.trained_params,
                    "reshard_network_bytes": sum(n.attr("network_bytes") for n in reshard),
                    "reshard_sync": [n.attr("sync", "weights") for n in reshard]})
    return out


def generation(repeats: int = 5) -> dict:
    """Merged vs unmerged LoRA generation on one engine: the hf engine generating
    through peft's unmerged forward, and the same engine with W + (alpha / r) B A swapped
    in (lora_hf.merged, what the fast engine's decode copy holds); a 3M-parameter Llama
    (vocab 512, hidden 256, 4 layers), 64 rows, 32 new tokens, greedy, fp32; the
    median seconds of `repeats` alternating calls, and whether the tokens agree."""
    import torch

    import graphrl as gr
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.lora_hf import merged

    lora = gr.LoRA(r=16, alpha=32, targets=("q_proj", "v_proj"))
    spec = gr.ModelSpec("llama", 512, 256, 4, 4, 4, 688, 128, dtype="fp32", lora=lora)
    e = HFEngine(gr.ModelDecl("policy", spec, "policy", True), {}, seed=0)
    with torch.no_grad():   # trained-looking adapters (B = 0 would make both the base)
        for n, p in e.module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    prompts = {"tokens": torch.randint(0, 512, (64, 16),
                                       generator=torch.Generator().manual_seed(0))}
    times: dict[str, list[float]] = {"unmerged": [], "merged": []}
    out = {}
    for _ in range(repeats):
        for kind in times:
            t = time.perf_counter()
            if kind == "merged":
                with merged(e.module):
                    out[kind] = e.generate(prompts, max_new_tokens=32, temperature=0.0)
            else:
                out[kind] = e.generate(prompts, max_new_tokens=32, temperature=0.0)
            times[kind].append(time.perf_counter() - t)
    same = float((out["merged"]["tokens"] == out["unmerged"]["tokens"]).float().mean())
    return {**{f"{k}_seconds": statistics.median(v) for k, v in times.items()},
            "token_agreement": same}


def measure_apart(lora: str, lr: float, iterations: int) -> dict:
    """`measure` in a fresh process: its peak resident set is this variant's alone."""
    import subprocess

    cmd = [sys.executable, __file__, "--one", lora or "full", "--one-lr", str(lr),
           "--iterations", str(iterations)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"lora_vs_full: the {lora or 'full'} run failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", default="policy",
                   help="the LoRA variant (default: the examples' own, docs/lora.md)")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--full-lr", type=float, default=2e-3)
    p.add_argument("--lora-lr", type=float, default=1e-2)
    p.add_argument("--parts", default="measured,planned,generation",
                   help="which parts to run (comma-separated)")
    p.add_argument("--out", metavar="FILE.json")
    p.add_argument("--one", metavar="VARIANT", help=argparse.SUPPRESS)   # measure_apart's
    p.add_argument("--one-lr", type=float, help=argparse.SUPPRESS)
    ns = p.parse_args()
    import torch

    torch.set_num_threads(1)
    cache: dict = {}
    if ns.one:
        lora = "" if ns.one == "full" else ns.one
        print(json.dumps(measure(lora, ns.one_lr, ns.iterations, cache)))
        return 0
    parts = ns.parts.split(",")
    result: dict = {}
    if "measured" in parts:
        result["measured"] = []
        for _ in range(ns.repeats):
            result["measured"].append(measure_apart("", ns.full_lr, ns.iterations))
            result["measured"].append(measure_apart(ns.lora, ns.lora_lr, ns.iterations))
    if "planned" in parts:
        result["planned"] = planned("") + planned(ns.lora)
    if "generation" in parts:
        result["generation"] = generation()
    text = json.dumps(result, indent=1)
    print(text)
    if ns.out:
        Path(ns.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
