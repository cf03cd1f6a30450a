"""Predictions against published RLHF setups: writes docs/published_setups.md.

Each section compiles the setup a paper measured with graphrl's own planner (the full
pipeline, `graphrl.compiler.compile_graph`) and sets the predicted step beside what the
paper reports, with the reasons for the difference:

- HybridFlow (Sheng et al. 2024, arXiv 2409.19256, §8.4): 13B PPO placement study on
  A100-80G, 16-128 GPUs — which placement wins at which scale;
- ReaLHF / ReaL (Mei et al. 2024, arXiv 2406.14088): the "Scale Actor" throughput bars
  of its end-to-end comparison figure (actor 7B-70B, critic 7B, 8-64 H100), as drawn in
  the repository's figure docs/source/images/vws.svg (openpsi-project/ReaLHF, commit
  505986b): bar heights read from the SVG's geometry;
- DeepSpeed-Chat (Yao et al. 2023, arXiv 2308.01320; blogs/deepspeed-chat/README.md of
  microsoft/DeepSpeed, Table 2): an OPT-like 175B actor trained by PPO (stage 3) in 20
  hours on 64 A100-80G.

Run: python benchmarks/published_setups.py [--out docs/published_setups.md] (a few
minutes on 2 CPU cores: every row is a full compile).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import graphrl  # noqa: E402
from graphrl.cli import load_example  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.outputs import atomic_write_text  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "published_setups.md"
POLICIES = ("auto", "colocate-all", "split", "hybridflow")

# ReaL figure (docs/source/images/vws.svg), row "Scale Actor": ReaL's (red, #c03d3e) bar
# tops in SVG units, each panel's y=0 and y=1 gridlines, per GPU count. Values in the
# figure's unit (its axis carries no unit label in the SVG; the paper reports PFLOP/s).
REAL_SVG = {
    128: {"zero": 100.063854, "one": 79.153378,
          "tops": {8: 80.883828, 16: 73.054462, 32: 47.763127, 64: 32.553956}},
    384: {"zero": 100.063854, "one": 70.789187,
          "tops": {8: 77.476806, 16: 70.491934, 32: 54.070214, 64: 40.071275}},
}
REAL_ACTOR = {8: "7b", 16: "13b", 32: "34b", 64: "70b"}   # critic 7B throughout
REAL_BATCH, REAL_PROMPT = 512, 128     # assumed (see the section text)

# DeepSpeed-Chat Table 2 and its footnote: 131.9k queries of 256 tokens, answers of 256,
# 1024 query-answer pairs per step, reward (and critic) OPT-350M, one epoch in 20 hours.
DSC_QUERIES, DSC_BATCH, DSC_HOURS = 131_900, 1024, 20.0

# OPT shapes (Zhang et al. 2022, Table 1) as Llama-shaped configs with the same parameter
# count per layer: OPT's ReLU FFN has 2 matrices of h x 4h, a SwiGLU one 3 of h x ffn, so
# ffn = 8h/3 gives 12h^2 per layer either way.
OPT = {
    "175b": dict(hidden_size=12288, num_hidden_layers=96, num_attention_heads=96),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}


def opt_config(size: str) -> dict[str, Any]:
    c = OPT[size]
    h = c["hidden_size"]
    return {"model_type": "llama", "vocab_size": 50272, "hidden_size": h,
            "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": c["num_attention_heads"],
            "num_key_value_heads": c["num_attention_heads"],
            "intermediate_size": round(8 * h / 3), "max_position_embeddings": 2048}


@dataclass
class Row:
    label: str
    gpus: int
    seconds: dict[str, float | None]
    tokens: int            # prompt + response tokens per step
    placement: str = ""


def build(algo: str, *, epochs: int | None = None, minibatches: int | None = None,
          **opts: Any) -> Any:
    graph = load_example(str(ROOT / "examples" / f"{algo}.py"))(
        graphrl.RunOptions(**opts)).program().graph
    if epochs is None:
        return graph
    for n in graph.nodes:   # the published recipe's optimizer steps per batch
        if n.target == "train":
            attrs = dict(n.attrs)
            attrs.update(epochs=epochs, minibatches=minibatches)
            graph = graph.replace_node(n.name, replace(n, attrs=tuple(attrs.items())))
    return graph


def predict(graph: Any, cluster: str, policy: str, engine: str = "graph"
            ) -> tuple[float | None, str]:
    try:
        c = compile_graph(graph, ClusterSpec.parse(cluster), policy, gen_engine=engine)
    except graphrl.GraphRLError as e:
        return None, str(e).splitlines()[0]
    ev = c.findings["evaluation"]
    groups: dict[str, list[str]] = {}
    for unit, mesh in ev.assignment:
        groups.setdefault(mesh.text(), []).append(unit)
    return c.plan.predicted_step_seconds, "; ".join(
        f"{'+'.join(u)}@{m}" for m, u in sorted(groups.items()))


def _s(x: float | None) -> str:
    return "infeasible" if x is None else f"{x:.1f}"


# -- HybridFlow ---------------------------------------------------------------------------
def hybridflow(log) -> list[str]:
    graph = build("ppo", model_size="13b", prompt_len=1024, response_len=1024,
                  batch_size=1024)
    rows = []
    for nodes in (2, 4, 8, 12, 16):
        secs = {}
        for p in POLICIES:
            secs[p] = predict(graph, f"{nodes}x8xA100", p)[0]
        rows.append(Row(f"{nodes * 8}", nodes * 8, secs, 1024 * 2048))
        log(f"hybridflow {nodes * 8} GPUs: " + ", ".join(f"{p} {_s(s)}" for p, s in secs.items()))
    out = ["## HybridFlow placement study (Sheng et al. 2024, arXiv 2409.19256, §8.4): "
           "13B PPO on A100-80G", "",
           "HybridFlow reports that colocating every model is the best placement at "
           "16-64 GPUs and that separate pools win at 96-128 GPUs for 13B PPO. Our "
           "prediction: PPO with actor, critic, reference and reward all Llama-2-13B-shaped, "
           "prompt 1024 / response 1024, batch 1024, graph-class generation engine "
           "(step seconds):", "",
           "| GPUs | auto | colocate-all | split | hybridflow | best baseline |",
           "|-----:|-----:|-------------:|------:|-----------:|---------------|"]
    shift = []
    for r in rows:
        base = {p: s for p, s in r.seconds.items() if p != "auto" and s is not None}
        best = min(base, key=base.get) if base else "-"
        same = [p for p in base if p != best and abs(base[p] - base[best]) < 1e-6]
        shift.append(best)
        out.append(f"| {r.gpus} | " + " | ".join(_s(r.seconds[p]) for p in POLICIES)
                   + f" | {best}{' (= ' + ', '.join(same) + ')' if same else ''} |")
    split_wins = [r.gpus for r, b in zip(rows, shift) if b != "colocate-all"
                  and r.seconds.get("colocate-all") is not None
                  and r.seconds[b] < r.seconds["colocate-all"] - 1e-6]
    ratio = {r.gpus: r.seconds["split"] / r.seconds["colocate-all"] for r in rows
             if r.seconds.get("split") and r.seconds.get("colocate-all")}
    out += ["", "split / colocate-all step: " + ", ".join(
        f"{g} GPUs {v:.2f}x" for g, v in ratio.items()) + ".", ""]
    first = ratio[min(ratio)] if ratio else float("nan")
    narrowest = min(ratio, key=ratio.get) if ratio else 0
    if split_wins:
        out.append(f"The published shift appears: a non-colocated placement beats "
                   f"colocate-all at {', '.join(map(str, split_wins))} GPUs.")
    else:
        out.append(
            "Agreement: colocation is best at 16-64 GPUs, as published. Disagreement: the "
            "published shift to separate pools at 96-128 GPUs does not appear, though "
            f"split's disadvantage shrinks from {first:.2f}x at {min(ratio)} GPUs to "
            f"{ratio[narrowest]:.2f}x at {narrowest}. Reasons: (1) 96 GPUs are now "
            "used whole (uneven data-parallel splits over whole nodes), and TP groups "
            "spanning nodes, ring all-reduces and ZeRO-3 gathers growing with degree are "
            "priced, but with 1024 sequences per step every call still has >= 8 sequences "
            "per GPU at 128 GPUs, where this cost model's compute efficiency stays high; "
            "(2) HybridFlow's split pools run generation in its own engine with its own "
            "parallelism while training keeps another, and measure stragglers and "
            "kernel-efficiency losses of small per-GPU batches that an analytic model "
            "without measured multi-node data does not have (our calibration is one "
            "H100); (3) `split` here is OpenRLHF-style (a pool per model), not "
            "HybridFlow's split placement (models grouped into fewer pools); `hybridflow` "
            "(its Algorithm 1) and `auto` explore such groupings, and `auto` stays at or "
            "below every baseline.")
    return out + [""]


# -- ReaLHF -------------------------------------------------------------------------------
def real_reported(gen: int, gpus: int) -> float:
    p = REAL_SVG[gen]
    return (p["zero"] - p["tops"][gpus]) / (p["zero"] - p["one"])


def realhf(log) -> list[str]:
    out = ["## ReaLHF / ReaL (Mei et al. 2024, arXiv 2406.14088): throughput, Scale Actor", "",
           "Reported: ReaL's bars in the repository's throughput figure "
           "(openpsi-project/ReaLHF, docs/source/images/vws.svg at commit 505986b, row "
           "\"Scale Actor\": the actor grows 7B/13B/34B/70B with 8/16/32/64 H100 while the "
           "critic stays 7B; panels Gen.Len.=128 and 384), read from the SVG's bar "
           "geometry against its gridlines (2 decimals). The SVG carries no unit label, so "
           "absolute values are compared only through a unit-free ratio: the throughput "
           "at generation length 384 over that at 128, same models and GPUs (tokens/s and "
           "FLOP/s give the same ratio up to the attention term). The figure's batch size "
           f"and prompt length were not recoverable here; we price batch {REAL_BATCH} and "
           f"prompt {REAL_PROMPT} (an assumption) with PPO (actor, reference = actor size; "
           "critic, reward = 7B), `auto`, graph-class engine.", "",
           "| GPUs | actor | reported @128 | reported @384 | reported 384/128 | "
           "predicted step @128 s | predicted step @384 s | predicted tokens/s @128 | "
           "predicted 384/128 |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    rep_ratios, pred_ratios = [], []
    for gpus, actor in REAL_ACTOR.items():
        size = f"policy={actor},reference={actor},critic=7b,reward=7b"
        steps, tps = {}, {}
        for gen in (128, 384):
            graph = build("ppo", model_size=size, prompt_len=REAL_PROMPT, response_len=gen,
                          batch_size=REAL_BATCH)
            steps[gen] = predict(graph, f"{gpus // 8}x8xH100", "auto")[0]
            tps[gen] = (REAL_BATCH * (REAL_PROMPT + gen) / steps[gen]) if steps[gen] else None
        rep = {g: real_reported(g, gpus) for g in (128, 384)}
        rr = rep[384] / rep[128]
        pr = tps[384] / tps[128] if tps[128] and tps[384] else None
        rep_ratios.append(rr)
        pred_ratios.append(pr)
        log(f"realhf {gpus} GPUs {actor}: reported {rep}, predicted steps {steps}")
        out.append(f"| {gpus} | {actor} | {rep[128]:.2f} | {rep[384]:.2f} | {rr:.2f} | "
                   f"{_s(steps[128])} | {_s(steps[384])} | "
                   f"{'-' if tps[128] is None else f'{tps[128]:,.0f}'} | "
                   f"{'-' if pr is None else f'{pr:.2f}'} |")
    rep_lo, rep_hi = min(rep_ratios), max(rep_ratios)
    known = [r for r in pred_ratios if r is not None]
    falls = sum(r < 1 for r in known)
    out += ["", f"Reasons for the differences: (1) ReaL's throughput falls to "
            f"{rep_lo:.2f}-{rep_hi:.2f}x when generation grows from 128 to 384 tokens, the "
            f"more so at 34B-70B; ours is {min(known):.2f}-{max(known):.2f}x (falls in "
            f"{falls} of {len(known)} rows): in this model a decode step costs the HBM-"
            "bandwidth bound plus a per-layer floor, so 3x the response tokens cost less "
            "than 3x the generation time once the batch's KV cache fits, and the "
            "prompt-side work and training are amortised over more tokens; "
            "(2) ReaL generates with its own Megatron-style engine under the plan's "
            "parallelism rather than a separate serving engine; where a decode step costs "
            "more than the graph-class engine priced here, throughput is more sensitive to "
            "generation length than our prediction; "
            "(3) the batch and prompt length are assumed, not read from the paper, and "
            "`auto`'s plan is not ReaL's plan (each row's placement differs).", ""]
    return out


# -- DeepSpeed-Chat -----------------------------------------------------------------------
def deepspeed_chat(log) -> list[str]:
    reported = DSC_HOURS * 3600 / (DSC_QUERIES / DSC_BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for size in OPT:
            paths[size] = Path(tmp) / f"opt-{size}.json"
            paths[size].write_text(json.dumps(opt_config(size)))
        configs = (("policy", str(paths["175b"])), ("reference", str(paths["175b"])),
                   ("critic", str(paths["350m"])), ("reward", str(paths["350m"])))
        graph = build("ppo", model_config=configs, prompt_len=256, response_len=256,
                      batch_size=DSC_BATCH, epochs=1, minibatches=1)
        rows = []
        for policy, engine in (("colocate-all", "hf"), ("colocate-all", "graph"),
                               ("auto", "graph")):
            secs, where = predict(graph, "8x8xA100", policy, engine)
            rows.append((policy, engine, secs, where))
            log(f"deepspeed-chat {policy} {engine}: {_s(secs)} ({where})")
    out = ["## DeepSpeed-Chat OPT-like-175B (Yao et al. 2023, arXiv 2308.01320)", "",
           "Reported (DeepSpeed blog blogs/deepspeed-chat/README.md, Table 2 and its "
           "footnote): stage 3 (PPO) of an OPT-like-175B actor with an OPT-350M reward "
           "model takes 20 hours for one epoch of 131.9k queries on 64 A100-80G, queries "
           "and answers of 256 tokens, 1024 query-answer pairs per step: "
           f"131.9k / 1024 = {DSC_QUERIES / DSC_BATCH:.1f} steps, i.e. "
           f"**{reported:.0f} s per step**. Our setup: the same shapes as Llama-shaped "
           "configs (OPT-175B: h=12288, 96 layers, 96 heads; OPT-350M: h=1024, 24 layers; "
           "FFN 8h/3 so each layer has OPT's 12h^2 parameters), actor and reference 175B, "
           "critic and reward 350M, 8x8xA100-80G, 256/256 tokens, batch 1024, one PPO "
           "epoch of one minibatch (DeepSpeed-Chat's defaults).", "",
           "| policy | generation engine | predicted s/step | reported s/step | "
           "predicted / reported | placement |", "|---|---|---:|---:|---:|---|"]
    for policy, engine, secs, where in rows:
        ratio = "-" if secs is None else f"{secs / reported:.2f}x"
        out.append(f"| {policy} | {engine} | {_s(secs)} | {reported:.0f} | {ratio} | "
                   f"{where if secs is not None else where[:120]} |")
    out += ["", "Reasons for the differences: (1) DeepSpeed-Chat's hybrid engine generates "
            "with DeepSpeed-Inference kernels re-sharded from ZeRO-3 training every step, "
            "without paged KV or continuous batching, closest to the eager (`hf`) class "
            "here; (2) its 20 hours are wall clock of the whole stage (data loading, "
            "logging, checkpoints, the tokenizer and sampling on the host), which we do not "
            "model; (3) OPT's learned positions and ReLU FFN are priced as a "
            "Llama-shaped model of equal parameter count; (4) the reward and critic are "
            "tiny (350M), so the step is the 175B actor's generation and training and the "
            "reference forward; (5) the eager (`hf`) class is infeasible here because it "
            "prices generation as one static batch per replica whose whole KV cache must "
            "be resident, while DeepSpeed-Chat generates in smaller per-device generation "
            "batches.", ""]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="published_setups.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT.relative_to(ROOT)), metavar="FILE.md")
    ap.add_argument("--only", choices=("hybridflow", "realhf", "deepspeed-chat"))
    ns = ap.parse_args(argv)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    sections = {"hybridflow": hybridflow, "realhf": realhf, "deepspeed-chat": deepspeed_chat}
    lines = ["# Predictions against published setups", "",
             "Generated by `benchmarks/published_setups.py` "
             f"(`python benchmarks/published_setups.py`, commit {commit}). Each row is the "
             "compiler's own prediction (full pipeline, 8% memory headroom, fixed response "
             "lengths) for a setup a paper measured, beside what the paper reports, with the "
             "reasons for each difference. Predictions are step seconds of the cost model "
             "and simulator, not measurements.", ""]
    for name, fn in sections.items():
        if ns.only in (None, name):
            lines += fn(log)
    lines.append(f"Generated in {time.perf_counter() - t0:.0f} s.")
    out = ROOT / ns.out if not Path(ns.out).is_absolute() else Path(ns.out)
    atomic_write_text(out, "\n".join(lines) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
