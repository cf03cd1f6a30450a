"""Evaluation during training: held-out prompts scored every N iterations, in the graph.

    graphrl run examples/text_grpo.py --data train.jsonl --eval-data test.jsonl \
        --eval-every 10 --eval-samples 4 --eval-greedy --metrics m.jsonl

An example that evaluates gives its Experiment an `Evaluation`: the held-out prompts (a
fixed payload), their Prompts spec and the reward op that scores them (Rollout -> Scores
over the held-out rows). `Experiment.program()` then traces an eval step beside the
training step and merges it into the same graph (`add_evaluation`):

    %eval_rollout = call generate[policy](%policy@1, %eval_prompts) {eval_every=10, samples=4, ...}
    %eval_scores  = op text_reward(%eval_rollout) {eval_every=10}
    (--eval-greedy: the same again at temperature 0, one sample: %eval_greedy_*)

The eval nodes read the weights the step's train leaves (%policy@1: a train overwrites
its weights in place, so every reader of the step's starting weights must run before
it, graphrl/verify.py) and feed nothing the step trains on: the compiler places them like
any call (insert-reshard moves the trained weights to the eval generate's layout when
it differs) and may overlap them with the step's other work after that train (a critic's
train, host ops). They carry `eval_every=N`, and executors run them (and a reshard that
only they read) only after every N-th training step: at 0-based iterations i with
(i + 1) % N == 0, so the row of iteration i scores the policy after i + 1 steps (`due`).
The plan prices an evaluating step (the eval nodes included).

Sampling: generate's other options (max_new_tokens, temperature, top_p, top_k, stop) are
those of the step's own generate on that model. Every call draws from its own generator
seeded by (seed, iteration, node name), so evaluation leaves the training run's random
stream untouched: a run trains exactly as it does without evaluation.

Metrics (the runner adds them to that iteration's metrics row): with n = --eval-samples
samples per prompt, c of them correct (reward >= --eval-threshold, default 0.5: right for
0/1 rewards), `eval/pass@k` is the unbiased estimator of Chen et al. 2021 ("Evaluating
Large Language Models Trained on Code", eq. 1), 1 - C(n-c, k) / C(n, k), averaged over
the prompts, for k = 1 and k = n; `eval/reward_mean` and `eval/response_length_mean` over
all samples; with --eval-greedy `eval/greedy_pass@1` and `eval/greedy_reward_mean` from
temperature-0 decoding.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

from .errors import UsageError
from .graph import CALL, Graph, Node
from .trace import OpDef, Program, trace
from .types import PayloadSpec

EVAL_EVERY = "eval_every"   # the node attribute marking eval nodes
EVAL_INPUT = "eval_prompts"
OUTPUTS = ("eval_scores", "eval_rollout", "eval_greedy_scores", "eval_greedy_rollout")
GENERATE_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_at_eos")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class EvalOptions:
    """every: evaluate after every N-th training step; samples: responses per prompt (the n
    of pass@k); greedy: also decode at temperature 0; threshold: a response is correct
    when its reward >= threshold."""

    every: int
    samples: int = 1
    greedy: bool = False
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        for flag, value in (("--eval-every", self.every), ("--eval-samples", self.samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{flag} {value!r}: expected an integer >= 1")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold):
            raise UsageError(f"--eval-threshold {self.threshold!r}: expected a finite number")


def eval_options(opts: Any) -> EvalOptions | None:
    """The EvalOptions of RunOptions `opts` (None without --eval-every); the eval flags
    need --eval-every."""
    every = getattr(opts, "eval_every", None)
    if every is None:
        given = [flag for flag, on in (("--eval-data", opts.eval_data),
                                       ("--eval-samples", opts.eval_samples != 1),
                                       ("--eval-greedy", opts.eval_greedy),
                                       ("--eval-threshold",
                                        opts.eval_threshold != DEFAULT_THRESHOLD)) if on]
        if given:
            raise UsageError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} "
                             "--eval-every N (how often to evaluate)")
        return None
    if getattr(opts, "staleness", 0):
        raise UsageError(f"--eval-every with --staleness {opts.staleness}: evaluation runs "
                         "with synchronous steps only (--staleness 0)")
    return EvalOptions(every, opts.eval_samples, opts.eval_greedy, opts.eval_threshold)


@dataclass(frozen=True)
class Evaluation:
    """What an Experiment evaluates on: `prompts` (a Prompts payload, fixed for the run)
    of type `spec`, scored by `score` (an op Rollout -> Scores) on model `model`'s
    responses; `source` says where the prompts come from (for show and the summary)."""

    options: EvalOptions
    prompts: Mapping[str, Any]
    spec: PayloadSpec
    score: OpDef
    model: str = "policy"
    source: str = ""

    def inputs(self) -> dict[str, Any]:
        return {EVAL_INPUT: self.prompts}


def due(node: Node, iteration: int) -> bool:
    """Whether `node` runs at `iteration` (0-based): eval nodes after every
    eval_every-th training step, i.e. when (iteration + 1) % eval_every == 0."""
    every = node.attr(EVAL_EVERY)
    return every is None or (iteration + 1) % int(every) == 0


def is_eval(node: Node) -> bool:
    return node.attr(EVAL_EVERY) is not None


def run_attrs(node: Node) -> dict[str, Any]:
    """The node's attributes as its kernel or engine takes them (without eval_every)."""
    return {k: v for k, v in node.attrs if k != EVAL_EVERY}


def _generate_options(graph: Graph, model: str) -> dict[str, Any]:
    gens = [n for n in graph.nodes if n.kind == CALL and n.target == "generate"
            and n.model == model and not is_eval(n)]
    if not gens:
        raise UsageError(f"--eval-every: step @{graph.name} has no {model}.generate call "
                         "to evaluate")
    return {k: v for k, v in gens[0].attrs if k in GENERATE_OPTIONS}


def _eval_step(ev: Evaluation, options: Mapping[str, Any]) -> Any:
    """The eval step: sampled (and greedy) responses to the held-out prompts, scored."""
    def step(**kw: Any) -> dict[str, Any]:
        prompts, model = kw[EVAL_INPUT], kw[ev.model]
        rollout = model.generate(prompts, **{**options, "samples": ev.options.samples})
        out = {"eval_scores": ev.score(rollout), "eval_rollout": rollout}
        if ev.options.greedy:
            greedy = model.generate(prompts, **{**options, "temperature": 0.0, "samples": 1})
            out |= {"eval_greedy_scores": ev.score(greedy), "eval_greedy_rollout": greedy}
        return out

    kind = inspect.Parameter.KEYWORD_ONLY
    step.__signature__ = inspect.Signature(   # type: ignore[attr-defined]
        [inspect.Parameter(EVAL_INPUT, kind), inspect.Parameter(ev.model, kind)])
    return step


def add_evaluation(program: Program, ev: Evaluation) -> Program:
    """`program` with the eval step of `ev` merged into its graph (module doc)."""
    from .verify import verify_graph

    g = program.graph
    if ev.model not in program.models:
        raise UsageError(f"--eval-every: step @{g.name} has no model {ev.model!r}")
    options = _generate_options(g, ev.model)
    model = replace(program.models[ev.model], init_from="")
    traced = trace(_eval_step(ev, options), [model], name=f"{g.name}_eval",
                   **{EVAL_INPUT: ev.spec})
    taken = {v.name for v in g.values()}
    new = [v for n in traced.graph.nodes for v in n.outputs] + \
          [v for v in traced.graph.inputs if not v.spec.is_weights]
    clash = sorted(v.name for v in new if v.name in taken)
    if clash:
        raise UsageError(f"--eval-every: step @{g.name} already has value(s) "
                         f"{', '.join(clash)}; rename them")
    ops = dict(program.ops)
    for name, op in traced.ops.items():
        if name in ops and ops[name] != op:
            raise UsageError(f"--eval-every: the eval reward op {name!r} differs from the "
                             "step's op of that name; give it another name")
        ops[name] = op
    every = ev.options.every
    start = f"%{ev.model}@0"
    trained = dict(g.carries).get(start, start)   # the weights the step's train leaves
    nodes = tuple(replace(n, inputs=tuple(trained if i == start else i for i in n.inputs),
                          attrs=tuple(sorted(n.attrs + ((EVAL_EVERY, every),))))
                  for n in traced.graph.nodes)
    merged = replace(g, inputs=g.inputs + tuple(v for v in traced.graph.inputs
                                                if not v.spec.is_weights),
                     nodes=g.nodes + nodes, outputs=g.outputs + traced.graph.outputs)
    return replace(program, graph=verify_graph(merged), ops=ops)


def eval_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if is_eval(n)]


def describe(graph: Graph) -> list[str]:
    """Lines for `graphrl show/compile`: the eval nodes, how often they run, what they
    may overlap and how the plan prices them."""
    nodes = eval_nodes(graph)
    if not nodes:
        return []
    every = nodes[0].attr(EVAL_EVERY)
    names = {n.name for n in nodes}
    placed = [n for n in nodes if n.placement is not None]
    lines = [f"evaluation every {every} training steps (iterations {every - 1}, "
             f"{2 * every - 1}, ...) on the trained weights: {', '.join(n.name for n in nodes)}"
             "; nothing the step trains on depends on them, so they may overlap the "
             "step's later calls",
             "  the plan prices an evaluating step (eval nodes included); other steps "
             "skip them"]
    for n in placed:
        if n.timing is None:
            continue
        others = [m for m in graph.nodes if m.name not in names and m.placement is not None
                  and m.timing is not None
                  and m.timing.start < n.timing.end and n.timing.start < m.timing.end]
        overlap = ", ".join(m.call for m in others) or "nothing (runs alone)"
        lines.append(f"  {n.name} {n.placement.text()}: {n.timing.seconds:.3f} s "
                     f"(that is {n.timing.seconds / every:.3f} s per step over {every} steps), "
                     f"overlaps {overlap}")
    return lines


# -- metrics -------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_metrics(outputs: Mapping[str, Any], options: EvalOptions) -> dict[str, float]:
    """The `eval/...` metrics of an evaluating step's outputs (module doc)."""
    n = options.samples
    scores = outputs["eval_scores"]["score"].float()
    correct = (scores.view(-1, n) >= options.threshold).sum(dim=1).tolist()
    lengths = outputs["eval_rollout"]["response_mask"].sum(dim=1).float()
    row = {"eval/reward_mean": float(scores.mean())}
    for k in sorted({1, n}):
        row[f"eval/pass@{k}"] = sum(pass_at_k(n, int(c), k) for c in correct) / len(correct)
    row["eval/response_length_mean"] = float(lengths.mean())
    if "eval_greedy_scores" in outputs:
        greedy = outputs["eval_greedy_scores"]["score"].float()
        row["eval/greedy_pass@1"] = float((greedy >= options.threshold).float().mean())
        row["eval/greedy_reward_mean"] = float(greedy.mean())
    row["eval/prompts"] = float(len(correct))
    return row


def check_evaluates(exp: Any, opts: Any) -> None:
    """--eval-every asks for an Experiment that evaluates (its example sets
    `evaluation` from the options)."""
    asked = eval_options(opts)
    if asked is not None and exp.evaluation is None:
        raise UsageError(f"--eval-every: {exp.name} does not evaluate (its example sets no "
                         "Experiment.evaluation; examples/grpo.py, ppo.py and text_grpo.py "
                         "do)")


def text_evaluation(path: str, options: EvalOptions, reward: Any, tokenizer: Any, *,
                    prompt_field: str = "prompt", chat_template: bool = False,
                    model: str = "policy", timeout: float | None = None) -> Evaluation:
    """An Evaluation on every row of the prompts file `path` (--eval-data: JSONL or
    Parquet, the fields of --data), scored by the text reward function `reward`
    (graphrl.rewards) over those rows, each call within `timeout` seconds."""
    from .data import PromptData, load_rows
    from .rewards import text_reward

    rows = load_rows(path, prompt_field, flag="--eval-data")
    data = PromptData(rows, tokenizer, batch=len(rows), chat_template=chat_template)
    from .signatures import prompts_spec

    return Evaluation(options, data.prompts(list(range(len(rows)))),
                      prompts_spec(len(rows), data.prompt_len),
                      text_reward(reward, data, name="eval_text_reward", timeout=timeout), model,
                      source=f"{len(rows)} prompts of {path}")


def eval_summary(rows: Any) -> list[str]:
    """The run summary's line on its evaluations: first and last of each eval/pass@k
    and eval/reward_mean (none when the run did not evaluate)."""
    evals = [r for r in rows if "eval/reward_mean" in r]
    if not evals:
        return []
    keys = [k for k in evals[-1] if k.startswith("eval/pass@")] + ["eval/reward_mean"]
    return [f"  held-out ({len(evals)} evaluations, iterations {evals[0]['iteration']}.."
            f"{evals[-1]['iteration']}): " + "   ".join(
                f"{k[5:]} {evals[0][k]:.3f} -> {evals[-1][k]:.3f}" for k in keys)]
