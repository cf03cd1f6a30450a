"""Plan quality: the `auto` placement policy against colocate-all, split and hybridflow.

Compiles the PPO and GRPO examples with Llama-2-shaped models (7b ... 70b, and mixed
sizes) for H100-80G and A100-80G clusters of 8 to 256 GPUs, with every placement policy,
and reports the simulated step time of each plan, auto's speedup over each baseline and
auto's compile time. Writes a Markdown report and a plot.

    python benchmarks/plan_quality.py                  # full suite, docs/plan_quality.md
    python benchmarks/plan_quality.py --quick --out /tmp/pq.md    # a handful of cases
    python benchmarks/plan_quality.py --only 'ppo 70b'  # cases whose name contains this

Step seconds are the compiler's own prediction (`Plan.predicted_step_seconds`: the cost
model, scheduled and simulated after resharding), not measurements on GPUs.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import graphrl  # noqa: E402
from graphrl.cli import load_example  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compile_cli import POLICY_NAMES  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402

BASELINES = tuple(p for p in POLICY_NAMES if p != "auto")
GEN_ENGINE = "graph"
PPO_PROMPTS = 512          # PPO: 512 prompts, one response each
GRPO_PROMPTS = 128         # GRPO: 128 prompts x GROUP_SIZE (4) responses = 512 sequences
COMPILE_TARGET_S = 2.0     # issue target: auto compiles 4-model PPO on 256 GPUs in < 2 s
GEOMEAN_TARGET = 1.3       # issue target: geomean speedup over colocate-all >= 1.3
DEFAULT_OUT = ROOT / "docs" / "plan_quality.md"
TIE = 1e-6                 # relative: auto slower than a baseline by more than this = worse

SIZES = {  # label -> --model-size string
    "7b": "7b", "13b": "13b", "34b": "34b", "70b": "70b",
    "70b+rm7b": "policy=70b,reference=70b,critic=70b,reward=7b",
    "34b+rm7b": "policy=34b,reference=34b,critic=34b,reward=7b",
    "70b+cr7b+rm7b": "policy=70b,reference=70b,critic=7b,reward=7b",
}
GPUS = {"H100": "H100-80G", "A100": "A100-80G"}


@dataclass(frozen=True)
class Case:
    algo: str            # ppo | grpo
    size: str            # a key of SIZES
    nodes: int           # x 8 GPUs per node
    gpu: str = "H100"    # a key of GPUS
    prompt_len: int = 1024
    response_len: int = 1024

    @property
    def gpus(self) -> int:
        return self.nodes * 8

    @property
    def cluster(self) -> str:
        return f"{self.nodes}x8x{GPUS[self.gpu]}"

    @property
    def lengths(self) -> str:
        return f"{self.prompt_len}/{self.response_len}"

    @property
    def name(self) -> str:
        return f"{self.algo} {self.size} {self.lengths} {self.nodes}x8x{self.gpu}"

    @property
    def model_size(self) -> str:
        size = SIZES[self.size]
        if self.algo == "grpo" and "critic=" in size:  # GRPO has no critic
            size = ",".join(p for p in size.split(",") if not p.startswith("critic="))
        return size


def _grid(algos: Iterable[str], sizes: Iterable[str], nodes: Iterable[int], **kw: Any
          ) -> list[Case]:
    return [Case(a, s, n, **kw) for a in algos for s in sizes for n in nodes]


def full_suite() -> list[Case]:
    """The representative suite (see docs/plan_quality.md for the reasoning)."""
    all_nodes = (1, 2, 4, 8, 16, 32)
    cases = []
    # H100, 1024/1024: every size on every cluster size, both algorithms.
    cases += _grid(["ppo"], ["7b", "13b", "34b", "70b", "70b+rm7b", "70b+cr7b+rm7b"],
                   all_nodes)
    cases += _grid(["grpo"], ["7b", "13b", "34b", "70b", "70b+rm7b"], all_nodes)
    # H100, long responses (512/2048): a subset.
    cases += _grid(["ppo"], ["7b", "34b+rm7b", "70b"], (2, 8, 32), prompt_len=512,
                   response_len=2048)
    cases += _grid(["grpo"], ["7b", "70b"], (2, 8, 32), prompt_len=512, response_len=2048)
    # A100, 1024/1024: a subset.
    cases += _grid(["ppo"], ["7b", "13b", "70b"], (1, 4, 16), gpu="A100")
    cases += _grid(["grpo"], ["7b", "34b"], (1, 4, 16), gpu="A100")
    return cases


def quick_suite() -> list[Case]:
    return [Case("ppo", "7b", 1), Case("ppo", "13b", 2), Case("grpo", "7b", 2),
            Case("ppo", "7b", 2, prompt_len=512, response_len=2048),
            Case("grpo", "13b", 1, gpu="A100")]


# -- running -----------------------------------------------------------------------------
@dataclass
class PolicyResult:
    policy: str
    status: str                      # ok | infeasible | error
    step_seconds: float | None = None
    search_seconds: float | None = None   # the placement search's own estimate
    compile_wall: float | None = None
    compile_cpu: float | None = None
    assign_seconds: float | None = None   # the assign-devices pass (placement search)
    plan: str = ""
    error: str = ""


@dataclass
class CaseResult:
    case: Case
    results: dict[str, PolicyResult] = field(default_factory=dict)
    wall: float = 0.0

    @property
    def auto(self) -> PolicyResult:
        return self.results["auto"]

    def speedup(self, baseline: str) -> float | None:
        a, b = self.auto, self.results[baseline]
        if a.status == "ok" and b.status == "ok":
            return b.step_seconds / a.step_seconds
        return None


def _describe(compiled: Any) -> str:
    """Auto's plan in a few words: units grouped by mesh, streaming, offloaded GPUs."""
    ev = compiled.findings["evaluation"]
    short = {"policy.generate": "gen", "policy": "actor", "reference": "ref",
             "reward": "rm", "critic": "critic"}
    groups: dict[str, list[str]] = {}
    for unit, mesh in ev.assignment:
        groups.setdefault(mesh.text(), []).append(short.get(unit, unit))
    text = " ".join(f"{'+'.join(units)}@{mesh}" for mesh, units in
                    sorted(groups.items(), key=lambda kv: int(kv[0].split("-")[0].split(",")[0])))
    extra = []
    if ev.stream > 1:
        extra.append(f"stream x{ev.stream}")
    if ev.offloaded_gpus:
        extra.append(f"offload {len(ev.offloaded_gpus)} GPUs")
    return text + (f" ({', '.join(extra)})" if extra else "")


def compile_one(graph: Any, cluster: ClusterSpec, policy: str) -> PolicyResult:
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        compiled = compile_graph(graph, cluster, policy, gen_engine=GEN_ENGINE)
    except graphrl.GraphRLError as e:
        return PolicyResult(policy, "infeasible", compile_wall=time.perf_counter() - t0,
                            compile_cpu=time.process_time() - c0,
                            error=str(e).splitlines()[0])
    except Exception as e:  # a compiler bug, not an infeasible case: reported loudly
        return PolicyResult(policy, "error", compile_wall=time.perf_counter() - t0,
                            compile_cpu=time.process_time() - c0,
                            error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    notes = dict(compiled.plan.notes)
    return PolicyResult(policy, "ok", compiled.plan.predicted_step_seconds,
                        float(notes.get("search_step_seconds", "nan")), wall, cpu,
                        dict(compiled.timings).get("assign-devices"),
                        _describe(compiled) if policy == "auto" else "")


_BUILDS: dict[str, Callable[..., Any]] = {}


def build_graph(case: Case) -> Any:
    if case.algo not in _BUILDS:
        _BUILDS[case.algo] = load_example(str(ROOT / "examples" / f"{case.algo}.py"))
    prompts = PPO_PROMPTS if case.algo == "ppo" else GRPO_PROMPTS
    opts = graphrl.RunOptions(model_size=case.model_size, prompt_len=case.prompt_len,
                              response_len=case.response_len, batch_size=prompts)
    return _BUILDS[case.algo](opts).program().graph


def run_case(case: Case) -> CaseResult:
    t0 = time.perf_counter()
    graph = build_graph(case)
    cluster = ClusterSpec.parse(case.cluster)
    out = CaseResult(case)
    for policy in POLICY_NAMES:   # auto first, as `graphrl compare` does
        out.results[policy] = compile_one(graph, cluster, policy)
    out.wall = time.perf_counter() - t0
    return out


def warm_up() -> None:
    """Import and first-call costs out of the timings: one small compile, not reported."""
    compile_one(build_graph(Case("ppo", "7b", 1)), ClusterSpec.parse("1x8xH100"), "auto")


# -- summary -----------------------------------------------------------------------------
def geomean(xs: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(results: Sequence[CaseResult]) -> dict[str, Any]:
    s: dict[str, Any] = {"cases": len(results), "per_baseline": {}}
    for b in BASELINES:
        sp = [(r.speedup(b), r.case.name) for r in results if r.speedup(b) is not None]
        worst = min(sp) if sp else (None, "")
        best = max(sp) if sp else (None, "")
        s["per_baseline"][b] = {
            "compared": len(sp), "geomean": geomean([x for x, _ in sp]),
            "worst": worst[0], "worst_case": worst[1], "best": best[0], "best_case": best[1],
            "wins": sum(1 for x, _ in sp if x > 1 + 1e-3),
            "ties": sum(1 for x, _ in sp if abs(x - 1) <= 1e-3),
            "baseline_infeasible_auto_ok": [r.case.name for r in results
                                            if r.auto.status == "ok"
                                            and r.results[b].status != "ok"]}
    worse = []
    for r in results:
        for b in BASELINES:
            rb = r.results[b]
            if rb.status != "ok":
                continue
            if r.auto.status != "ok":
                worse.append((r.case.name, b, f"auto {r.auto.status}, {b} feasible"))
            elif r.auto.step_seconds > rb.step_seconds * (1 + TIE):
                worse.append((r.case.name, b, f"auto {r.auto.step_seconds:.3f} s > "
                              f"{b} {rb.step_seconds:.3f} s"))
    s["auto_worse"] = worse
    s["errors"] = [(r.case.name, p, pr.error) for r in results for p, pr in r.results.items()
                   if pr.status == "error"]
    s["all_infeasible"] = [r.case.name for r in results
                           if all(pr.status == "infeasible" for pr in r.results.values())]
    timed = [r for r in results if r.auto.compile_wall is not None]
    slow = max(timed, key=lambda r: r.auto.compile_wall)
    s["max_compile"] = (slow.auto.compile_wall, slow.auto.compile_cpu, slow.case.name)
    s["ppo256"] = [(r.case.name, r.auto.compile_wall, r.auto.compile_cpu, r.auto.assign_seconds,
                    r.auto.status) for r in results
                   if r.case.algo == "ppo" and r.case.gpus == 256]
    colo = s["per_baseline"]["colocate-all"]["geomean"]
    s["targets"] = {
        "auto >= every policy on every case": not worse,
        f"geomean speedup over colocate-all >= {GEOMEAN_TARGET}":
            colo is not None and colo >= GEOMEAN_TARGET,
        f"auto compiles 4-model PPO on 256 GPUs in < {COMPILE_TARGET_S:g} s":
            bool(s["ppo256"]) and all(w is not None and w < COMPILE_TARGET_S
                                      for _, w, _, _, _ in s["ppo256"]),
    }
    s["wall"] = sum(r.wall for r in results)
    return s


# -- output ------------------------------------------------------------------------------
def _sec(pr: PolicyResult) -> str:
    if pr.status == "ok":
        return f"{pr.step_seconds:.2f}"
    return "infeasible" if pr.status == "infeasible" else "ERROR"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table_rows(results: Sequence[CaseResult]) -> list[list[str]]:
    head = (["case"] + [f"{p} s" for p in POLICY_NAMES] + [f"vs {b}" for b in BASELINES]
            + ["auto compile s"])
    rows = [head]
    for r in results:
        rows.append([r.case.name] + [_sec(r.results[p]) for p in POLICY_NAMES]
                    + [_x(r.speedup(b)) for b in BASELINES]
                    + [f"{r.auto.compile_wall:.2f}"])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = []
    for b, d in s["per_baseline"].items():
        g = "-" if d["geomean"] is None else f"{d['geomean']:.3f}x"
        w = "-" if d["worst"] is None else f"{d['worst']:.3f}x ({d['worst_case']})"
        bst = "-" if d["best"] is None else f"{d['best']:.2f}x ({d['best_case']})"
        lines.append(f"auto vs {b}: geomean {g} over {d['compared']} cases both feasible; "
                     f"worst {w}; best {bst}; auto faster in {d['wins']}, tied (within 0.1%) "
                     f"in {d['ties']}; {b} infeasible but auto feasible in "
                     f"{len(d['baseline_infeasible_auto_ok'])} cases")
    if s["auto_worse"]:
        lines.append(f"!!! AUTO IS WORSE THAN A BASELINE IN {len(s['auto_worse'])} "
                     f"(case, baseline) PAIRS:")
        lines += [f"!!!   {c}: {why}" for c, _, why in s["auto_worse"]]
    else:
        lines.append("auto is never worse than any policy (0 cases)")
    if s["errors"]:
        lines.append(f"!!! COMPILER ERRORS (not GraphRLError) IN {len(s['errors'])} compiles:")
        lines += [f"!!!   {c} [{p}]: {e}" for c, p, e in s["errors"]]
    lines.append(f"cases where every policy is infeasible: {len(s['all_infeasible'])}")
    w, c, name = s["max_compile"]
    lines.append(f"max auto compile time: {w:.2f} s wall ({c:.2f} s CPU) on {name}")
    for name, w, c, a, st in s["ppo256"]:
        lines.append(f"auto compile, {name}: {w:.2f} s wall, {c:.2f} s CPU "
                     f"(placement search {'-' if a is None else f'{a:.2f} s'}; {st})")
    for t, ok in s["targets"].items():
        lines.append(f"target: {t}: {'met' if ok else 'NOT MET'}")
    return lines


def plot(results: Sequence[CaseResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.case.gpus for r in results})
    pos = {g: i for i, g in enumerate(sizes)}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    styles = {("ppo", "H100"): ("tab:blue", "o"), ("grpo", "H100"): ("tab:orange", "s"),
              ("ppo", "A100"): ("tab:green", "^"), ("grpo", "A100"): ("tab:red", "D")}
    for ax, b in zip(axes.flat, BASELINES):
        top = max([r.speedup(b) or 1 for r in results] + [1.05]) * 1.25
        for (algo, gpu), (color, marker) in styles.items():
            xs, ys, xi = [], [], []
            for k, r in enumerate(results):
                if r.case.algo != algo or r.case.gpu != gpu:
                    continue
                jitter = ((k * 0.618) % 1 - 0.5) * 0.5
                v = r.speedup(b)
                if v is not None:
                    xs.append(pos[r.case.gpus] + jitter)
                    ys.append(v)
                elif r.auto.status == "ok":
                    xi.append(pos[r.case.gpus] + jitter)
            ax.scatter(xs, ys, c=color, marker=marker, s=28, alpha=0.8,
                       label=f"{algo.upper()} {gpu}")
            ax.scatter(xi, [top] * len(xi), facecolors="none", edgecolors=color,
                       marker=marker, s=40)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(top, color="grey", lw=0.5, ls=":")
        ax.text(len(sizes) - 0.5, top, f"{b} infeasible, auto feasible", ha="right",
                va="bottom", fontsize=8, color="grey")
        ax.set_yscale("log")
        ax.set_ylim(0.9, top * 1.15)
        ax.set_xticks(range(len(sizes)), [str(g) for g in sizes])
        ax.set_xlabel("GPUs")
        ax.set_ylabel(f"{b} step / auto step")
        ax.set_title(f"auto speedup over {b}")
        ax.grid(True, which="both", axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left")
    ax = axes[1, 1]
    for (algo, gpu), (color, marker) in styles.items():
        pts = [(pos[r.case.gpus] + ((k * 0.618) % 1 - 0.5) * 0.5, r.auto.compile_wall)
               for k, r in enumerate(results) if r.case.algo == algo and r.case.gpu == gpu]
        if pts:
            ax.scatter(*zip(*pts), c=color, marker=marker, s=28, alpha=0.8,
                       label=f"{algo.upper()} {gpu}")
    ax.axhline(COMPILE_TARGET_S, color="r", lw=0.8, ls="--", label=f"{COMPILE_TARGET_S:g} s target")
    ax.set_yscale("log")
    ax.set_xticks(range(len(sizes)), [str(g) for g in sizes])
    ax.set_xlabel("GPUs")
    ax.set_ylabel("seconds (wall)")
    ax.set_title("auto compile time (compile_graph, whole pipeline)")
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"graphrl plan quality: {len(results)} cases, gen engine '{GEN_ENGINE}', "
                 "simulated step time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: Sequence[CaseResult], s: dict[str, Any], command: str,
             png: Path | None, out: Path, quick: bool, discussion: str = "") -> str:
    c = {b: sum(1 for r in results if r.results[b].status == "ok") for b in POLICY_NAMES}
    lines = [
        "# Plan quality: `auto` against the baseline placement policies",
        "",
        "Generated by `benchmarks/plan_quality.py`" + (" (**--quick**: smoke-test subset)"
                                                        if quick else "") + ".",
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {platform.machine()}, {_cpus()} CPU cores, Python "
        f"{platform.python_version()}. Suite wall time: {s['wall']:.0f} s.",
        "",
        "## Suite",
        "",
        f"- Algorithms: PPO (`examples/ppo.py`: policy/actor, reference, reward, critic) with "
        f"{PPO_PROMPTS} prompts per step; GRPO (`examples/grpo.py`: policy, reference, reward) "
        f"with {GRPO_PROMPTS} prompts x group 4 = {GRPO_PROMPTS * 4} responses per step. Both "
        "examples train 2 epochs x 2 minibatches per step.",
        "- Models: Llama-2-shaped presets via `--model-size`: " + "; ".join(
            f"`{k}` = `{v}`" for k, v in SIZES.items()) + " (GRPO drops the critic).",
        "- Clusters: `Nx8x<GPU>`, N = 1, 2, 4, 8, 16, 32 (8 to 256 GPUs), H100-80G and "
        "A100-80G presets of `graphrl/cluster.py`.",
        f"- Generation engine: `{GEN_ENGINE}` (CUDA-graph captured, vLLM/SGLang class) for "
        "every policy.",
        "- Policies: " + ", ".join(f"`{p}`" for p in POLICY_NAMES) + "; each compiled with "
        "`graphrl.compiler.compile_graph` (the full pipeline: assign-devices, choose-overlap, "
        "insert-reshard, lower, verify). A `GraphRLError` counts as *infeasible*; any other "
        "exception is a compiler *ERROR* and is flagged.",
        "- Step seconds: `Plan.predicted_step_seconds` (cost model + simulator, after "
        "resharding): predictions, not GPU measurements.",
        "- Compile time: `time.perf_counter()` around `compile_graph(..., 'auto')` (wall; "
        "CPU time is reported too, as other jobs may share the machine). One small compile "
        "warms imports first and is not reported.",
        f"- Feasible plans per policy: " + ", ".join(f"{p} {c[p]}/{len(results)}"
                                                    for p in POLICY_NAMES) + ".",
        "",
    ]
    if not quick:
        lines += [
            "Selection (the full cross product, 7 sizes x 2 algorithms x 6 clusters x 2 GPUs "
            "x 2 length settings, is too slow on 2 cores: the insert-reshard pass takes tens "
            "of seconds per plan for 70b models on 128-256 GPUs):",
            "",
            "- H100, prompt/response 1024/1024: PPO 7b, 13b, 34b, 70b, 70b+rm7b, "
            "70b+cr7b+rm7b and GRPO 7b, 13b, 34b, 70b, 70b+rm7b, each on all six cluster "
            "sizes;",
            "- H100, 512/2048: PPO 7b, 34b+rm7b, 70b and GRPO 7b, 70b on 16, 64 and 256 GPUs;",
            "- A100, 1024/1024: PPO 7b, 13b, 70b and GRPO 7b, 34b on 8, 32 and 128 GPUs.",
            "",
            "Cases where no policy fits (e.g. 70b PPO on 8 GPUs) are kept in the table but "
            "drop out of every ratio.",
            "",
        ]
    lines += ["## Results", "",
              "Simulated step seconds per policy; `vs X` = X's step / auto's step (> 1: auto "
              "faster); `-` where either side is infeasible.", "",
              md_table(table_rows(results)), "",
              "## Summary", ""]
    lines += [f"- {x}" for x in summary_lines(s)]
    lines += ["", "### Auto's plans", "",
              "Units grouped by mesh (`gen` = the policy's generation unit, `actor` = its "
              "forward/train), streaming factor and offloaded GPUs.", "",
              "| case | auto plan | auto s | search s | placement search s |",
              "|---|---|---:|---:|---:|"]
    for r in results:
        a = r.auto
        if a.status == "ok":
            lines.append(f"| {r.case.name} | {a.plan} | {a.step_seconds:.2f} | "
                         f"{a.search_seconds:.2f} | {a.assign_seconds:.2f} |")
        else:
            lines.append(f"| {r.case.name} | {a.status}: {a.error} | - | - | - |")
    if png is not None:
        rel = png.name if png.parent == out.parent else str(png)
        lines += ["", "## Plot", "", f"![auto speedup per case]({rel})", "",
                  "Each point is one case; hollow markers on the dotted line: the baseline "
                  "found no feasible plan but auto did. Bottom right: auto's compile time "
                  "(log scale) against the 2 s target."]
    if discussion:
        lines += ["", discussion.strip()]
    return "\n".join(lines) + "\n"


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


DISCUSSION_FILE = "plan_quality_discussion.md"


def run(quick: bool = False, out: Path | str | None = DEFAULT_OUT,
        png: Path | str | None = "auto", only: str | None = None, verbose: bool = True,
        command: str | None = None) -> tuple[list[CaseResult], dict[str, Any]]:
    """Run the suite; write the report to `out` (and the plot next to it). Returns the
    results and the summary."""
    cases = quick_suite() if quick else full_suite()
    if only:
        cases = [c for c in cases if only in c.name]
    if not cases:
        raise SystemExit(f"no case matches --only {only!r}")
    say = print if verbose else (lambda *a, **k: None)
    warm_up()
    results = []
    rows = [table_rows([])[0]]
    say(f"plan quality: {len(cases)} cases, policies {', '.join(POLICY_NAMES)}, "
        f"gen engine {GEN_ENGINE}")
    for i, case in enumerate(cases, 1):
        r = run_case(case)
        results.append(r)
        row = table_rows([r])[1]
        rows.append(row)
        say(f"[{i}/{len(cases)} {r.wall:5.1f}s] " + "  ".join(row), flush=True)
    s = summarize(results)
    say("")
    say(text_table(rows))
    say("")
    for line in summary_lines(s):
        say(line)
    say(f"suite wall time: {s['wall']:.1f} s")
    if out is not None:
        out = Path(out)
        if png == "auto":
            png = out.with_suffix(".png")
        if png is not None:
            plot(results, Path(png))
        disc = ROOT / "benchmarks" / DISCUSSION_FILE
        discussion = disc.read_text() if disc.is_file() and not quick else ""
        cmd = command or ("python benchmarks/plan_quality.py" + (" --quick" if quick else "")
                          + (f" --only '{only}'" if only else "") + f" --out {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown(results, s, cmd, Path(png) if png else None, out, quick,
                                discussion))
        say(f"wrote {out}" + (f" and {png}" if png else ""))
    return results, s


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="plan_quality.py",
        description="Compare graphrl's auto placement policy with colocate-all, split and "
                    "hybridflow over a suite of PPO/GRPO workloads (7b-70b Llama-2 shapes, "
                    "8-256 H100/A100 GPUs): simulated step time, auto's speedup, auto's "
                    "compile time. Writes a Markdown report and a PNG plot.")
    p.add_argument("--quick", action="store_true",
                   help="a handful of small cases (smoke test, < 60 s)")
    p.add_argument("--out", default=str(DEFAULT_OUT.relative_to(ROOT)), metavar="FILE.md",
                   help="Markdown report to write (default docs/plan_quality.md); the plot "
                        "goes next to it as FILE.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--only", metavar="TEXT",
                   help="run only the cases whose name contains TEXT, e.g. 'ppo 70b'")
    ns = p.parse_args(argv)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    _, s = run(quick=ns.quick, out=ns.out, png=None if ns.no_plot else "auto", only=ns.only,
               command=f"python benchmarks/plan_quality.py {argv_text}".strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
