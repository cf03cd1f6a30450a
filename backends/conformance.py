"""`graphrl check-model DIR`: does each engine compute what Hugging Face's own module
computes on a local checkpoint? Run before paying for a cluster.

For each engine x strategy, on a small probe batch of random token ids (some rows
left-padded; position ids 0 at each row's first real token, as the engines and HF's
generate use them):
- log-probs: the engine's per-token log-probs against `AutoModelForCausalLM.from_pretrained
  (DIR)` in fp32 (log-softmax of its logits), at every real position after a real one;
- one optimizer step (GRPO on random advantages, AdamW): the engine's weights after the
  step against a one-process `hf` engine's after the same step, as the whole update's
  relative error ||dw_engine - dw_hf|| / ||dw_hf|| (docs/engines.md: Adam turns float
  noise in a near-zero gradient into a full step of either sign, so single weights are a
  loose measure), and the loss;
- `fast` only: greedy generation, token for token against a greedy loop over HF's module.

An engine that does not implement a feature of the checkpoint is refused before it runs
(graphrl.architecture.refuse_unsupported, or the engine's own UsageError): a refusal is a
truthful answer, not a failure. Multi-rank engines (megatron tp/pp, DeepSpeed ZeRO) run
in spawned gloo processes on CPU (conformance_ranks.py).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from graphrl.errors import ExecutionError, UsageError

from .conformance_ranks import measure

ENGINES = ("hf", "fast", "megatron", "deepspeed")
SPAWNED = ("megatron", "deepspeed")
PRECISIONS = ("fp32", "bf16")
LR = 1e-3                 # the step's AdamW learning rate
GREEDY_TOKENS = 6         # tokens `fast` generates greedily per prompt
MODEL_NAME = "model"


@dataclass(frozen=True)
class Tolerance:
    """Largest differences accepted: log-prob (absolute), the step's whole-update
    relative error, the loss (absolute)."""

    logprob: float
    step: float
    loss: float


# fp32: docs/engines.md's differential tolerances (forward 1e-5, whole update 5e-3, mean
# loss 1e-4). bf16 (8 mantissa bits: relative 2^-9 ~ 2e-3 per rounding), measured on the
# six tiny families (graphrl.families, 3 probe seeds) against HF's module in fp32:
# log-probs differ by at most 0.07 (weights cast to bf16) / 0.06 (fp32 weights, bf16
# autocast); one AdamW step with fp32 master weights and bf16 autocast has a relative
# update error of at most 0.17; the GRPO loss on-policy moves only through its KL term
# (< 2e-5). The bounds leave about 3x margin (loss: the KL term's worst case at that
# log-prob bound). A dropped feature moves log-probs by far more on these checkpoints:
# llama3 run as plain rotary 0.95 at 16 tokens, qwen2 without its biases 2.2 (every
# parameter carries N(0, 0.2) noise). benchmarks/model_matrix.py re-measures the bf16
# rounding each time it regenerates docs/models.md.
TOLERANCES = {"fp32": Tolerance(1e-5, 5e-3, 1e-4), "bf16": Tolerance(0.2, 0.5, 5e-3)}


@dataclass(frozen=True)
class Strategy:
    """How one engine runs: its data / tensor / pipeline degrees and ZeRO stage."""

    engine: str
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def text(self) -> str:
        if self.engine == "deepspeed":
            return f"zero={self.zero} dp={self.dp}"
        parts = [f"{k}={v}" for k, v in (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))
                 if v > 1]
        return " ".join(parts) or "dp=1"


@dataclass
class Result:
    """One engine x strategy: ok, refused (reason) or mismatch (reason)."""

    engine: str
    strategy: str
    precision: str
    status: str
    max_logprob_diff: float | None = None
    max_step_diff: float | None = None
    reason: str = ""
    loss_diff: float | None = None
    greedy: str = ""          # fast: "rows equal / rows" ("" for other engines)

    def as_json(self) -> dict[str, Any]:
        out = {"engine": self.engine, "strategy": self.strategy, "precision": self.precision,
               "status": self.status, "max_logprob_diff": self.max_logprob_diff,
               "max_step_diff": self.max_step_diff, "reason": self.reason,
               "loss_diff": self.loss_diff}
        if self.greedy:
            out["greedy"] = self.greedy
        return out

    def line(self) -> str:
        where = f"{self.engine} {self.strategy}"
        if self.status == "refused":
            return f"refused {where}: {self.reason}"
        nums = (f"max |Δ logprob| {_num(self.max_logprob_diff)}  step "
                f"{_num(self.max_step_diff)}  loss {_num(self.loss_diff)}"
                + (f"  greedy {self.greedy}" if self.greedy else ""))
        if self.status == "ok":
            return f"✓ {where}  {self.precision}  {nums}" + (
                f"  ({self.reason})" if self.reason else "")
        return f"✗ mismatch {where}  {self.precision}  {nums}: {self.reason}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


# -- what runs here ----------------------------------------------------------------------
def available_engines() -> list[str]:
    """The engines this machine can run: hf and fast always; megatron and deepspeed when
    their packages are installed (engines.registry.installed)."""
    from .engines.registry import BUILDERS, installed

    return [e for e in BUILDERS if installed(e)]


def strategies(engines: Sequence[str], *, tp: int | None = None, pp: int | None = None,
               zero: int | None = None, dp: int | None = None) -> list[Strategy]:
    """The strategies to check: hf and fast in one process; megatron at the given tp/pp
    (default: tp=2, then pp=2); deepspeed at the given ZeRO stage and dp (default 3, 2)."""
    out = []
    for e in engines:
        if e not in ENGINES:
            raise UsageError(f"--engine {e!r}: unknown engine (known: {', '.join(ENGINES)})")
        if e == "megatron":
            if tp is None and pp is None:
                out += [Strategy(e, tp=2), Strategy(e, pp=2)]
            else:
                out.append(Strategy(e, tp=tp or 1, pp=pp or 1))
        elif e == "deepspeed":
            out.append(Strategy(e, dp=2 if dp is None else dp, zero=3 if zero is None else zero))
        else:
            out.append(Strategy(e))
    for s in out:
        if min(s.dp, s.tp, s.pp) < 1 or not 0 <= s.zero <= 3:
            raise UsageError(f"{s.engine} {s.text()}: degrees must be >= 1 and ZeRO 0-3")
    return out


# -- the checkpoint ----------------------------------------------------------------------
def read_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any], Any]:
    """(directory, config.json, Architecture); UsageError for a directory that is not a
    Hugging Face checkpoint or a config graphrl's architecture audit refuses."""
    from graphrl.architecture import FAMILIES, architecture
    from graphrl.hf_dir import check_model_dir

    # the directory's files here; its config through the architecture audit below
    d = check_model_dir(directory, read=False)
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"model directory {directory}: config.json: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"model directory {directory}: config.json is not a JSON object")
    kind = config.get("model_type", "llama")
    if kind not in FAMILIES:
        raise UsageError(f"model directory {directory}: config.json: model_type {kind!r} "
                         f"is not a family graphrl knows ({', '.join(FAMILIES)})")
    try:
        arch = architecture(config)
    except KeyError as e:
        raise UsageError(f"model directory {directory}: config.json lacks {e}") from None
    except (ValueError, TypeError) as e:
        raise UsageError(f"model directory {directory}: config.json: {e}") from None
    return d, config, arch


def model_decl(directory: Path, config: Mapping[str, Any], precision: str = "fp32") -> Any:
    """The ModelDecl engines build for this checkpoint, in `precision` (UsageError if
    graphrl cannot read its shape)."""
    from dataclasses import replace

    from graphrl.graph import ModelDecl
    from graphrl.types import ModelSpec

    try:
        spec = ModelSpec.from_hf_config(dict(config))
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(f"model {directory}: graphrl cannot read this config: {e}") from None
    return ModelDecl(MODEL_NAME, replace(spec, dtype=precision), "policy", True)


# -- the probe -----------------------------------------------------------------------------
def probe_batch(vocab: int, prompts: int, seq: int, seed: int) -> dict[str, Any]:
    """Random token ids < vocab, odd rows left-padded; the GRPO step's inputs on them
    (response: each row's second half; random advantages; reference log-probs later)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (prompts, seq), generator=g)
    mask = torch.ones(prompts, seq)
    for r in range(1, prompts, 2):
        mask[r, :1 + (r // 2) % max(1, seq // 3)] = 0
    tokens[mask == 0] = 0
    response = torch.zeros(prompts, seq)
    response[:, seq // 2:] = 1
    return {"tokens": tokens, "attention_mask": mask, "response_mask": response * mask,
            "advantages": torch.randn(prompts, seq, generator=g),
            "noise": 0.05 * torch.randn(prompts, seq, generator=g)}


def positions(mask: Any) -> Any:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def compared(mask: Any) -> Any:
    """Positions whose log-prob is compared: real tokens after a real token."""
    import torch

    prev = torch.nn.functional.pad(mask[:, :-1], (1, 0))
    return (mask * prev) > 0


def hf_reference(directory: Path, probe: Mapping[str, Any]) -> tuple[Any, Any]:
    """(per-token log-probs, greedy continuation) of HF's own module in fp32: log-softmax
    of `AutoModelForCausalLM.from_pretrained(DIR)`'s logits, out[:, t] = log p(tok_t |
    tok_<t); greedy: GREEDY_TOKENS argmax steps, each a full forward (no cache), and the
    log-probs of each step (to tell a tie from a mismatch)."""
    import torch
    import transformers

    from .engines.hf_checkpoint import no_progress_bars

    with no_progress_bars():
        module = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, dtype=torch.float32)
    module.eval()
    tokens, mask = probe["tokens"], probe["attention_mask"].long()
    with torch.no_grad():
        lp = torch.log_softmax(module(input_ids=tokens, attention_mask=mask,
                                      position_ids=positions(mask)).logits.float(), -1)
        picked = lp[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        logprobs = torch.nn.functional.pad(picked, (1, 0))
        ids, m, steps = tokens, mask, []
        for _ in range(GREEDY_TOKENS):
            out = module(input_ids=ids, attention_mask=m, position_ids=positions(m)).logits
            step_lp = torch.log_softmax(out[:, -1].float(), -1)
            steps.append(step_lp)
            ids = torch.cat([ids, step_lp.argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return logprobs, (ids[:, tokens.shape[1]:], torch.stack(steps, 1))


def train_inputs(probe: Mapping[str, Any], ref_logprobs: Any) -> dict[str, dict[str, Any]]:
    return {"rollout": {k: probe[k] for k in ("tokens", "attention_mask", "response_mask")},
            "advantages": {"advantages": probe["advantages"]},
            "ref_logprobs": {"logprobs": ref_logprobs + probe["noise"]}}


def engine_options(directory: Path) -> dict[str, Any]:
    """Options of every engine checked (its precision is the decl's spec dtype)."""
    return {"checkpoint": str(directory), "lr": LR}


# -- comparing -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """HF's module's log-probs and greedy tokens; the one-process hf engine's step."""

    logprobs: Any
    greedy: tuple[Any, Any]
    start: Mapping[str, Any]      # weights before the step
    after: Mapping[str, Any]      # hf engine's weights after it
    loss: float


def update_error(start: Mapping[str, Any], after: Mapping[str, Any], ref: Reference) -> float:
    """||dw - dw_hf|| / ||dw_hf|| over the weights, each update from the engine's own
    starting weights (an engine that keeps bf16 weights starts from rounded ones).

    Left out: elements that both steps move by less than LR/2. A first AdamW step moves
    an element by lr * |g| / (|g| + eps) (bias-corrected moments are g and g^2), so
    those are the elements whose gradient is below eps = 1e-8 in both engines: float
    noise that Adam scales up to a random-signed move, e.g. GPT-2's and Qwen2's key
    bias, whose gradient is zero in exact arithmetic (softmax ignores a constant shift
    of a query's scores). An element one engine moves by a real gradient still counts."""
    import torch

    if set(after) != set(ref.after) or set(start) != set(ref.after):
        raise ExecutionError("the engine's weights are named differently from the hf "
                             f"engine's: {sorted(set(after) ^ set(ref.after))[:3]}")
    de = torch.cat([(after[k].float() - start[k].float()).reshape(-1) for k in ref.after])
    dr = torch.cat([(ref.after[k] - ref.start[k]).reshape(-1) for k in ref.after])
    signal = (de.abs() >= LR / 2) | (dr.abs() >= LR / 2)
    return float((de - dr)[signal].norm() / dr[signal].norm())


def greedy_rows(tokens: Any, ref: Reference, tol: float) -> tuple[int, int]:
    """(rows equal, rows): a row's greedy tokens equal the reference's up to its first
    difference, which counts as equal only where the reference's log-probs of the two
    tokens are within `tol` (a tie: either argmax is right)."""
    ref_tokens, ref_lp = ref.greedy
    same = 0
    for r in range(ref_tokens.shape[0]):
        diff = (tokens[r] != ref_tokens[r]).nonzero()
        if len(diff) == 0:
            same += 1
            continue
        t = int(diff[0])
        lp = ref_lp[r, t]
        same += float(lp[ref_tokens[r, t]] - lp[tokens[r, t]]) <= tol
    return same, ref_tokens.shape[0]


def judge(strategy: Strategy, measured: Mapping[str, Any], ref: Reference,
          keep: Any, asked: str) -> Result:
    """A Result from what an engine measured, judged at the asked precision's tolerance;
    an engine that ran another precision than asked is a mismatch (never silent)."""
    precision = measured["precision"]
    tol = TOLERANCES[asked]
    lp = float((measured["logprobs"].float() - ref.logprobs)[keep].abs().max())
    step = update_error(measured["start"], measured["weights"], ref)
    loss = abs(measured["loss"] - ref.loss)
    result = Result(strategy.engine, strategy.text(), precision, "ok", lp, step, "", loss)
    bad = []
    if "greedy" in measured:
        same, rows = greedy_rows(measured["greedy"], ref, tol.logprob)
        result.greedy = f"{same}/{rows}"
        if same < rows:
            bad.append(f"greedy tokens differ from HF's in {rows - same} of {rows} rows")
    for what, value, limit in (("log-prob", lp, tol.logprob), ("step", step, tol.step),
                               ("loss", loss, tol.loss)):
        if not value <= limit:   # NaN fails
            bad.append(f"{what} difference {value:.2e} > {limit:.0e}")
    if precision != asked:
        bad.append(f"asked {asked}, the engine ran {precision}")
    if bad:
        result.status = "mismatch"
        result.reason = "; ".join(bad)
    return result


# -- running ---------------------------------------------------------------------------------
def check_model(directory: str | Path, *, engines: Sequence[str] | None = None,
                plan: Sequence[Strategy] | None = None, precision: str = "bf16",
                prompts: int = 4, seq: int = 16, seed: int = 0,
                timeout_s: float = 600.0) -> list[Result]:
    """Check each engine x strategy (`plan`, else the default strategies of `engines`,
    else of every engine this machine runs) on the checkpoint in `directory`."""
    import torch

    from graphrl.architecture import refuse_unsupported

    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: use {' or '.join(PRECISIONS)}")
    if prompts < 2 or seq < 4:
        raise UsageError(f"--prompts {prompts} --seq {seq}: need at least 2 prompts of 4 "
                         "tokens (one left-padded row, a response half)")
    d, config, arch = read_checkpoint(directory)
    plan = list(plan) if plan is not None else strategies(engines or available_engines())
    for s in plan:
        if prompts % s.dp:
            raise UsageError(f"--prompts {prompts} do not split over {s.engine}'s dp={s.dp}")
    results: dict[int, Result] = {}
    todo = []
    for i, s in enumerate(plan):
        try:
            refuse_unsupported(str(d), s.engine, arch)
            todo.append(i)
        except UsageError as e:
            results[i] = Result(s.engine, s.text(), precision, "refused", reason=str(e))
    if todo:
        try:
            decl = model_decl(d, config, precision)
        except UsageError as e:
            for i in todo:
                results[i] = Result(plan[i].engine, plan[i].text(), precision, "refused",
                                    reason=str(e))
            todo = []
    if todo:
        probe = probe_batch(decl.spec.vocab_size, prompts, seq, seed)
        torch.manual_seed(seed)
        ref = reference(d, decl, probe)
        inputs = train_inputs(probe, ref.logprobs)
        keep = compared(probe["attention_mask"])
        local = [i for i in todo if plan[i].engine not in SPAWNED]
        for i in local:
            results[i] = run_local(plan[i], decl, d, probe, inputs, ref, keep, precision)
        spawned = [i for i in todo if plan[i].engine in SPAWNED]
        if spawned:
            got = run_spawned([plan[i] for i in spawned], decl, d, probe, inputs, precision,
                              timeout_s)
            for i, m in zip(spawned, got):
                results[i] = (judge(plan[i], m, ref, keep, precision) if "refused" not in m
                              else Result(plan[i].engine, plan[i].text(), precision,
                                          "refused", reason=m["refused"]))
    return [results[i] for i in range(len(plan))]


def reference(d: Path, decl: Any, probe: Mapping[str, Any]) -> Reference:
    from .engines.hf import HFEngine

    logprobs, greedy = hf_reference(d, probe)
    from dataclasses import replace

    hf = HFEngine(replace(decl, spec=replace(decl.spec, dtype="fp32")), engine_options(d))
    start = hf.export_weights()
    stats = hf.train(train_inputs(probe, logprobs), loss="grpo", seed=0)
    return Reference(logprobs, greedy, start, hf.export_weights(), float(stats["loss"]))


def run_local(s: Strategy, decl: Any, d: Path, probe: Mapping[str, Any],
              inputs: Mapping[str, Any], ref: Reference, keep: Any, precision: str) -> Result:
    """hf or fast in this process."""
    from .engines.registry import create_engine

    try:
        engine = create_engine(s.engine, decl, engine_options(d), "cpu", 0)
        got = {}
        if s.engine == "fast":
            out = engine.generate({k: probe[k] for k in ("tokens", "attention_mask")},
                                  max_new_tokens=GREEDY_TOKENS, temperature=0.0,
                                  stop_at_eos=False)
            got["greedy"] = out["tokens"][:, probe["tokens"].shape[1]:]
        got.update(measure(engine, probe, inputs))
    except UsageError as e:
        return Result(s.engine, s.text(), precision, "refused", reason=str(e))
    return judge(s, got, ref, keep, precision)


def run_spawned(plan: Sequence[Strategy], decl: Any, d: Path, probe: Mapping[str, Any],
                inputs: Mapping[str, Any], precision: str, timeout_s: float) -> list[dict]:
    """Each multi-rank strategy on one group of spawned gloo processes (as many as the
    largest strategy needs); what rank 0 measured, per strategy."""
    import torch

    from .engines.spawn import ENGINE_MODULES, spawn
    from .conformance_ranks import worker

    world = max(s.world for s in plan)
    what = ", ".join(f"{s.engine} {s.text()}" for s in plan)
    with tempfile.TemporaryDirectory(prefix="graphrl-check-") as tmp:
        job, out = os.path.join(tmp, "job.pt"), os.path.join(tmp, "out.pt")
        torch.save({"plan": [(s.engine, s.dp, s.tp, s.pp, s.zero, s.text()) for s in plan],
                    "decl": decl, "options": engine_options(d), "probe": dict(probe),
                    "inputs": inputs}, job)
        try:
            spawn(worker, (job, out), world, timeout_s, f"check-model {what}",
                  preload=ENGINE_MODULES)   # one import of megatron-core, not one a rank
        except ExecutionError as e:
            current = Path(out + ".current")
            at = f" (while checking {current.read_text()})" if current.is_file() else ""
            raise ExecutionError(f"{e}{at}") from None
        return torch.load(out, weights_only=False)


__all__ = ["ENGINES", "PRECISIONS", "TOLERANCES", "Tolerance", "Strategy", "Result",
           "available_engines", "strategies", "read_checkpoint", "check_model"]
