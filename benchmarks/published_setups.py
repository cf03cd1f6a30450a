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
    seconds, where, _ = predict_with_generation(graph, cluster, policy, engine)
    return seconds, where


def predict_with_generation(graph: Any, cluster: str, policy: str, engine: str = "graph"
                            ) -> tuple[float | None, str, float | None]:
    """(plan step seconds, placement text, generation seconds in the search's schedule)."""
    try:
        c = compile_graph(graph, ClusterSpec.parse(cluster), policy, gen_engine=engine)
    except graphrl.GraphRLError as e:
        return None, str(e).splitlines()[0], None
    ev = c.evaluation
    groups: dict[str, list[str]] = {}
    for unit, mesh in ev.assignment:
        groups.setdefault(mesh.text(), []).append(unit)
    generate = {n.name for n in graph.calls() if n.target == "generate"}
    gen = sum(s.end - s.start for s in ev.schedule if s.name in generate)
    return c.plan.predicted_step_seconds, "; ".join(
        f"{'+'.join(u)}@{m}" for m, u in sorted(groups.items())), gen


# HybridFlow's own "split" placement (§8.4): the actor (with its generation) and the
# reference on one pool, the critic and the reward model on the other; pool sizes searched.
HF_SPLIT = (("policy", "policy.generate", "reference"), ("critic", "reward"))


def predict_grouped(graph: Any, cluster: str, blocks: Sequence[Sequence[str]],
                    engine: str = "graph") -> float | None:
    """Step seconds of the lowered plan for the fastest GPU allocation of these colocated
    blocks (each block on one mesh, blocks on disjoint meshes; the placement search's
    `best_allocation`), every call's mesh pinned to it and its strategy searched."""
    from graphrl.passes.assign_devices import problem_from_graph, unit_of
    from graphrl.passes.base import PassContext
    from graphrl.passes.policies import best_allocation

    spec = ClusterSpec.parse(cluster)
    problem = problem_from_graph(graph, PassContext(spec, engine))
    ev = best_allocation(problem, [list(b) for b in blocks])
    if ev is None:
        return None
    where = dict(ev.assignment)
    placement = {n.call: {"gpus": where[unit_of(n)].text()} for n in graph.calls()}
    try:
        c = compile_graph(graph, spec, "colocate-all", gen_engine=engine, placement=placement)
    except graphrl.GraphRLError:
        return None
    return c.plan.predicted_step_seconds


def _s(x: float | None) -> str:
    return "infeasible" if x is None else f"{x:.1f}"


# -- HybridFlow ---------------------------------------------------------------------------
def hybridflow(log) -> list[str]:
    graph = build("ppo", model_size="13b", prompt_len=1024, response_len=1024,
                  batch_size=1024)
    rows, auto_where = [], {}
    for nodes in (2, 4, 8, 12, 16):
        secs = {}
        for p in POLICIES:
            secs[p], where = predict(graph, f"{nodes}x8xA100", p)
            if p == "auto":
                auto_where[nodes * 8] = where
        secs["split-hf"] = predict_grouped(graph, f"{nodes}x8xA100", HF_SPLIT)
        rows.append(Row(f"{nodes * 8}", nodes * 8, secs, 1024 * 2048))
        log(f"hybridflow {nodes * 8} GPUs: " + ", ".join(f"{p} {_s(s)}" for p, s in secs.items()))
    out = ["## HybridFlow placement study (Sheng et al. 2024, arXiv 2409.19256, §8.4): "
           "13B PPO on A100-80G", "",
           "HybridFlow reports that colocating every model is the best placement at "
           "16-64 GPUs and that its split placement wins at 96-128 GPUs for 13B PPO. Our "
           "prediction: PPO with actor, critic, reference and reward all Llama-2-13B-shaped, "
           "prompt 1024 / response 1024, batch 1024, graph-class generation engine "
           "(step seconds of the lowered plan). `split` is OpenRLHF-style (a pool per model "
           "and one for generation); `split-hf` is HybridFlow's split placement (actor with "
           "its generation and the reference on one pool, critic and reward on the other, "
           "pool sizes searched, strategies searched per call):", "",
           "| GPUs | auto | colocate-all | split | split-hf | hybridflow | best baseline |",
           "|-----:|-----:|-------------:|------:|---------:|-----------:|---------------|"]
    cols = ("auto", "colocate-all", "split", "split-hf", "hybridflow")
    shift = []
    for r in rows:
        base = {p: s for p, s in r.seconds.items() if p != "auto" and s is not None}
        best = min(base, key=base.get) if base else "-"
        same = [p for p in base if p != best and abs(base[p] - base[best]) < 1e-6]
        shift.append(best)
        out.append(f"| {r.gpus} | " + " | ".join(_s(r.seconds[p]) for p in cols)
                   + f" | {best}{' (= ' + ', '.join(same) + ')' if same else ''} |")
    split_wins = [r.gpus for r, b in zip(rows, shift) if b != "colocate-all"
                  and r.seconds.get("colocate-all") is not None
                  and r.seconds[b] < r.seconds["colocate-all"] - 1e-6]

    def ratios(policy: str) -> dict[int, float]:
        return {r.gpus: r.seconds[policy] / r.seconds["colocate-all"] for r in rows
                if r.seconds.get(policy) and r.seconds.get("colocate-all")}

    hf, ow = ratios("split-hf"), ratios("split")
    out += ["", "split-hf / colocate-all step: " + ", ".join(
        f"{g} GPUs {v:.3f}x" for g, v in hf.items()) + ".",
        "split / colocate-all step: " + ", ".join(f"{g} GPUs {v:.2f}x" for g, v in ow.items())
        + ".", ""]
    lines, phases = breakdown(graph, max(r.gpus for r in rows))
    out += lines
    gain = {r.gpus: r.seconds["colocate-all"] / r.seconds["auto"] for r in rows
            if r.seconds.get("auto") and r.seconds.get("colocate-all")}
    out += ["`auto`'s placements (units on GPU ranges) and its gain over colocate-all:", ""]
    out += [f"- {g} GPUs: {w} ({gain.get(g, float('nan')):.3f}x)"
            for g, w in auto_where.items()]
    out += ["", "Where `auto` gives the critic and the policy's training disjoint halves "
            "(each with one of the inference models) and spreads generation over every "
            "GPU, the models' training runs side by side as in HybridFlow's split placement "
            "while generation keeps the whole cluster, which HybridFlow's placements (its "
            "generation stays on the actor's pool) cannot express; in this model that is "
            "where the gain from splitting comes from.", ""]
    if split_wins:
        out.append(f"The published shift appears: a non-colocated placement beats "
                   f"colocate-all at {', '.join(map(str, split_wins))} GPUs.")
    else:
        g0, g1 = min(hf), max(hf)
        co, sp = phases.get("colocate-all"), phases.get("split-hf")
        why = ""
        if co and sp:
            why = (f" At {max(r.gpus for r in rows)} GPUs split-hf generates on half the "
                   f"GPUs and loses {sp['generate'] - co['generate']:.1f} s there, and wins "
                   f"back {co['forward'] - sp['forward']:.1f} s of inference and "
                   f"{co['train'] - sp['train']:.1f} s of training by running the critic's "
                   "and reward's calls beside the actor's. The costs that grow with the "
                   f"degree are priced: {co['scale']:.1f} s of colocate-all's step and "
                   f"{sp['scale']:.1f} s of split-hf's slowest pool are collectives, "
                   "pipeline bubbles and the reshard.")
        out.append(
            "Agreement: colocation is best at 16-64 GPUs, as published, and HybridFlow's "
            f"own split placement closes in on it as the cluster grows ({hf[g0]:.3f}x at "
            f"{g0} GPUs, {hf[g1]:.3f}x at {g1}). Disagreement: it does not overtake "
            "colocation at 96-128 GPUs. Why, precisely (the breakdown above): the critic/"
            "reward pool idles while the actor's pool generates, and generation scales "
            "worst of the calls (decode reads every weight and the KV cache each step; the "
            "per-layer floor does not shrink with more GPUs), yet colocate-all still "
            "generates faster on all GPUs than split-hf on half of them." + why + " These "
            "(TP and data-parallel collectives with NCCL's ring/tree latency per call, "
            "Megatron-sized gradient buckets, ZeRO-3 gathers per layer, TP groups crossing "
            "nodes, pipeline bubbles, resharding into the generation layout with "
            "HybridFlow's grouping only where it nests) stay a small share because 1024 "
            "sequences of 2048 tokens still give >= 8 sequences (16k tokens) per GPU per "
            "call, where compute efficiency stays near its calibrated ceiling, and a "
            "ring's bandwidth term per GPU does not grow with the ranks. "
            "What the model does not have, and HybridFlow's "
            "measurement does: stragglers and variance of synchronous collectives over "
            "128 GPUs, control-plane costs of its single controller per call, the "
            "response-length tail of a real dataset (fixed 1024 tokens here), and "
            "kernel-efficiency losses of TP-sliced GEMMs measured on multi-GPU nodes (our "
            "calibration is one H100; no TP or multi-node points to fit them to). A few "
            "percent of any of these, charged to the colocated step's longer critical "
            "path, would produce the published shift; we do not add such a term without a "
            "measurement to fit it to.")
    return out + [""]


SCALE_TERMS = ("tp_comm", "dp_comm", "pp_bubble")


def pool_phases(problem: Any, ev: Any) -> dict[str, float]:
    """Seconds per phase (generate / forward / train) of the calls on the mesh that
    finishes last (the step's critical pool), and `scale`: the collectives, pipeline
    bubbles and reshard inside them (the costs that grow with the parallel degree)."""
    from graphrl import cost

    calls = [s for s in ev.schedule if s.mesh is not None]
    last = max(calls, key=lambda s: s.end).mesh
    out = {"generate": 0.0, "forward": 0.0, "train": 0.0, "scale": ev.reshard_seconds}
    gpu, node = problem.cluster.gpu, problem.cluster.gpus_per_node
    for s in calls:
        if s.mesh != last:
            continue
        c = problem.by_name[s.name]
        out[c.phase] += s.end - s.start
        spec, st = problem.specs[c.model], s.choice.strategy
        if c.phase == "generate":
            b = cost.generate_breakdown(spec, c.batch, c.seq, c.new_tokens, st, gpu, "graph",
                                        gpus_per_node=node)
            out["scale"] += b["tp_comm_step"] * max(c.new_tokens - 1, 0)
        else:
            b = dict(cost.estimate(spec, c.phase, c.batch, c.seq, st, gpu,
                                   gpus_per_node=node).breakdown)
            out["scale"] += c.repeats * sum(b.get(k, 0.0) for k in SCALE_TERMS)
    return out


def breakdown(graph: Any, gpus: int) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Per-call durations of colocate-all and split-hf at `gpus` (the search's estimates,
    which the lowered plans above refine slightly) and their critical pools' phases."""
    from graphrl.passes.assign_devices import problem_from_graph
    from graphrl.passes.base import PassContext
    from graphrl.passes.policies import best_allocation, colocate_all

    problem = problem_from_graph(graph, PassContext(ClusterSpec.parse(
        f"{gpus // 8}x8xA100"), "graph"))
    lines = [f"Where the time goes at {gpus} GPUs (search estimates; call: GPUs, "
             "start-end s):", ""]
    phases = {}
    for name, ev in (("colocate-all", colocate_all(problem)),
                     ("split-hf", best_allocation(problem, [list(b) for b in HF_SPLIT]))):
        if ev is None:
            continue
        calls = "; ".join(f"{s.name.lstrip('%')} {s.mesh.size} GPUs {s.start:.1f}-{s.end:.1f}"
                          for s in ev.schedule if s.mesh is not None)
        ph = phases[name] = pool_phases(problem, ev)
        lines.append(f"- {name} ({ev.step_seconds:.1f} s): {calls}. Its slowest pool: "
                     f"generation {ph['generate']:.1f} s, inference {ph['forward']:.1f} s, "
                     f"training {ph['train']:.1f} s; of these, collectives, pipeline "
                     f"bubbles and the reshard {ph['scale']:.1f} s.")
    return lines + [""], phases


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
    rep_ratios, pred_ratios, shares = [], [], []
    for gpus, actor in REAL_ACTOR.items():
        size = f"policy={actor},reference={actor},critic=7b,reward=7b"
        steps, tps, gens = {}, {}, {}
        for gen in (128, 384):
            graph = build("ppo", model_size=size, prompt_len=REAL_PROMPT, response_len=gen,
                          batch_size=REAL_BATCH)
            steps[gen], _, gens[gen] = predict_with_generation(
                graph, f"{gpus // 8}x8xH100", "auto")
            tps[gen] = (REAL_BATCH * (REAL_PROMPT + gen) / steps[gen]) if steps[gen] else None
        rep = {g: real_reported(g, gpus) for g in (128, 384)}
        rr = rep[384] / rep[128]
        pr = tps[384] / tps[128] if tps[128] and tps[384] else None
        rep_ratios.append(rr)
        pred_ratios.append(pr)
        if steps[128] and steps[384] and gens[128] and gens[384]:
            # ReaL's step grew 2/rr times (twice the tokens at 1/rr the throughput). If its
            # generation grew as ours does (f_gen) and the rest as ours does (f_rest), the
            # share g of generation in its 128-token step solves 2/rr = g f_gen + (1-g) f_rest.
            f_gen = gens[384] / gens[128]
            f_rest = (steps[384] - gens[384]) / (steps[128] - gens[128])
            implied = (2 / rr - f_rest) / (f_gen - f_rest) if f_gen != f_rest else None
            shares.append((gpus, gens[128] / steps[128], f_gen, f_rest, implied))
        log(f"realhf {gpus} GPUs {actor}: reported {rep}, predicted steps {steps}")
        out.append(f"| {gpus} | {actor} | {rep[128]:.2f} | {rep[384]:.2f} | {rr:.2f} | "
                   f"{_s(steps[128])} | {_s(steps[384])} | "
                   f"{'-' if tps[128] is None else f'{tps[128]:,.0f}'} | "
                   f"{'-' if pr is None else f'{pr:.2f}'} |")
    rep_lo, rep_hi = min(rep_ratios), max(rep_ratios)
    known = [r for r in pred_ratios if r is not None]
    falls = sum(r < 1 for r in known)
    def implied(imp: float | None) -> str:
        if imp is None or imp < 0:
            return " (our plan changes between the two lengths, so this does not decompose)"
        if imp <= 1:
            return f", so ReaL's ratio implies generation ~{imp:.0%} of its step"
        return (", so no share of generation growing as ours does reaches ReaL's ratio: "
                "its step grew faster than ours")

    share_text = "; ".join(
        f"{g} GPUs: generation {sh:.0%} of our 128-token step, growing {fg:.2f}x (the rest "
        f"{fr:.2f}x){implied(imp)}" for g, sh, fg, fr, imp in shares)
    out += ["", f"Reasons for the differences: (1) ReaL's throughput falls to "
            f"{rep_lo:.2f}-{rep_hi:.2f}x when generation grows from 128 to 384 tokens, the "
            f"more so at 34B-70B; ours is {min(known):.2f}-{max(known):.2f}x (falls in "
            f"{falls} of {len(known)} rows). Our decode step reads the weights and the "
            "whole KV cache (linear in the context), so decode time grows faster than its "
            "tokens where the KV cache dominates (tests/test_published_setups.py); the "
            "generation call also prefills the prompts (a fixed cost), and training and "
            "the inference passes grow about 2x (twice the tokens). The ratio is therefore "
            "set by generation's share of the step, and ours is small with a graph-class "
            f"engine: {share_text}. "
            "(2) ReaL generates with its own engine under the plan's parallelism rather "
            "than a vLLM-class serving engine; a decode step that costs more than the "
            "graph-class one priced here (eager launches, no paged KV, padded static "
            "batches) raises generation's share and the sensitivity to its length; "
            "(3) fixed per-step costs (offload/onload swaps, resharding) weigh more in "
            "our short 128-token steps and are amortised at 384, which lifts our ratio; "
            "(4) the batch and prompt length are assumed, not read from the paper, and "
            "`auto`'s plan is not ReaL's plan (each row's placement differs, and differs "
            "between the two lengths).", ""]
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


def source_commit(root: Path) -> str:
    """'commit abc1234' (plus ', with uncommitted changes' when graphrl/, passes/ or
    benchmarks/ differ from it), or 'an unknown commit (not a git checkout)'."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "graphrl", "passes", "benchmarks")
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    if not head:
        return "an unknown commit (not a git checkout)"
    return f"commit {head}" + (", with uncommitted changes" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="published_setups.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", metavar="FILE.md",
                    help=f"where to write (default {DEFAULT_OUT.relative_to(ROOT)}; --only "
                         "needs another file: the default holds every section)")
    ap.add_argument("--only", choices=("hybridflow", "realhf", "deepspeed-chat"))
    ns = ap.parse_args(argv)
    if ns.only and ns.out is None:
        ap.error(f"--only {ns.only} writes one section: give --out FILE.md (the default, "
                 f"{DEFAULT_OUT.relative_to(ROOT)}, holds every section)")
    ns.out = ns.out or str(DEFAULT_OUT.relative_to(ROOT))
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    commit = source_commit(ROOT)
    sections = {"hybridflow": hybridflow, "realhf": realhf, "deepspeed-chat": deepspeed_chat}
    lines = ["# Predictions against published setups", "",
             "Generated by `benchmarks/published_setups.py` "
             f"(`python benchmarks/published_setups.py`, {commit}). Each row is the "
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
