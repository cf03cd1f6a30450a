"""The conformance matrix: `graphrl check-model` on a tiny random checkpoint of each model
family (graphrl.families) x engine and strategy (hf, fast, megatron tp=2, megatron pp=2,
DeepSpeed ZeRO-3 dp=2) x precision (fp32, bf16); writes docs/models.md.

Each cell is what check-model reports: ✓ with the largest log-prob difference against
Hugging Face's own module (fp32) and the relative update error of one optimizer step
against the one-process hf engine, "refused: <what the engine lacks>", or ✗ with what
differed. It also measures what bf16 rounding does to HF's own module on each family,
the evidence for check-model's bf16 tolerances (graphrl.backends.conformance).

Run: python benchmarks/model_matrix.py [--out docs/models.md] (about 15-20 minutes on
2 CPU cores: the multi-rank engines run as spawned gloo processes).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from graphrl.backends.engines.hf_checkpoint import no_progress_bars  # noqa: E402
from graphrl.families import TINY, save_random_checkpoint  # noqa: E402
from graphrl.outputs import atomic_write_text  # noqa: E402

COLUMNS = [("hf", "dp=1"), ("fast", "dp=1"), ("megatron", "tp=2"), ("megatron", "pp=2"),
           ("deepspeed", "zero=3 dp=2")]
GROUPS = (["--engine", "hf,fast"], ["--engine", "megatron,deepspeed"])
COMMAND = "python benchmarks/model_matrix.py --out docs/models.md"


def check_model(directory: Path, precision: str, engines: list[str]) -> tuple[list, str]:
    """check-model's JSON rows, or an error text when it failed (exit 2 or a crash)."""
    cmd = [sys.executable, "-m", "graphrl.cli", "check-model", str(directory), *engines,
           "--precision", precision, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    if p.returncode in (0, 1) and p.stdout.strip():   # 1 with no JSON: a failed run
        return json.loads(p.stdout), ""
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    return [], lines[-1] if lines else f"exit {p.returncode}"


def short_reason(reason: str) -> str:
    m = re.search(r"does not implement (.*?)\. Engines that can", reason)
    if m:
        return "lacks " + m.group(1)
    return reason.split(": ", 1)[-1] if reason.startswith("model ") else reason


def cell(row: dict | None, error: str) -> str:
    if row is None:
        return f"error: {error}" if error else "-"
    if row["status"] == "refused":
        return f"refused: {short_reason(row['reason'])}"
    nums = f"{row['max_logprob_diff']:.1e} / {row['max_step_diff']:.1e}"
    ran = f" (ran {row['precision']})" if "ran" in row["reason"] else ""
    if row["status"] == "ok":
        return f"✓ {nums}{ran}"
    return f"✗ {nums}: {row['reason']}"


def bf16_rounding(directory: Path) -> dict[str, Any]:
    """HF's own module against itself in fp32 on check-model's probe: log-probs with its
    weights cast to bf16, log-probs and one AdamW step (fp32 master weights) under bf16
    autocast."""
    import torch
    import transformers

    from graphrl.backends import conformance as c
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.hf_checkpoint import no_progress_bars
    from graphrl.errors import UsageError

    _, config, _ = c.read_checkpoint(directory)
    vocab = config["vocab_size"]
    probe = c.probe_batch(vocab, 4, 16, 0)
    ref, _ = c.hf_reference(directory, probe)
    keep = c.compared(probe["attention_mask"])
    tok, mask = probe["tokens"], probe["attention_mask"].long()
    with no_progress_bars():
        module = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, dtype=torch.float32).eval()

    def logprobs() -> Any:
        with torch.no_grad():
            lp = torch.log_softmax(module(input_ids=tok, attention_mask=mask,
                                          position_ids=c.positions(mask)).logits.float(), -1)
        picked = lp[:, :-1].gather(-1, tok[:, 1:].unsqueeze(-1)).squeeze(-1)
        return float((torch.nn.functional.pad(picked, (1, 0)) - ref)[keep].abs().max())

    out: dict[str, Any] = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out["autocast_logprob"] = logprobs()
    module.to(torch.bfloat16)
    out["weights_logprob"] = logprobs()
    try:
        decl = c.model_decl(directory, config, "bf16")
    except UsageError:
        return out
    reference = c.reference(directory, decl, probe)
    engine = HFEngine(decl, c.engine_options(directory))   # bf16 autocast, fp32 masters
    start = engine.export_weights()
    engine.train(c.train_inputs(probe, reference.logprobs), loss="grpo", seed=0)
    out["autocast_step"] = c.update_error(start, engine.export_weights(), reference)
    return out


def render(results: dict, rounding: dict, seconds: float) -> str:
    from graphrl.backends.conformance import TOLERANCES

    lines = ["# Model families x engines: the conformance matrix", "",
             "Generated by `" + COMMAND + "` (do not edit by hand; "
             f"{seconds / 60:.0f} minutes on this machine's CPUs). Each cell is what "
             "`graphrl check-model DIR --precision P` reports for a tiny random checkpoint "
             "of the family (graphrl/families.py: every parameter, biases and norms "
             "included, carries N(0, 0.2) noise): ✓ with the largest per-token log-prob "
             "difference against `AutoModelForCausalLM.from_pretrained(DIR)` in fp32 / "
             "the relative update error of one GRPO AdamW step against the one-process "
             "hf engine; `refused:` what the engine lacks (refused before it runs, never "
             "a silent difference); ✗ a difference beyond tolerance. `(ran fp32)`: bf16 "
             "was asked and the engine ran fp32 (it does not run bf16 yet).", "",
             "Tolerances: " + "; ".join(
                 f"{p}: log-prob {t.logprob:g}, step {t.step:g}, loss {t.loss:g}"
                 for p, t in TOLERANCES.items()) + " (fp32: docs/engines.md's "
             "differential tolerances; bf16: the measured rounding below with margin).", ""]
    header = "| family | " + " | ".join(f"{e} {s}" for e, s in COLUMNS) + " |"
    for precision in ("fp32", "bf16"):
        lines += [f"## {precision}", "", header, "|---" * (len(COLUMNS) + 1) + "|"]
        for family in TINY:
            rows, errors = results[(family, precision)]
            cells = []
            for engine, strategy in COLUMNS:
                row = next((r for r in rows if r["engine"] == engine
                            and r["strategy"] == strategy), None)
                cells.append(cell(row, errors.get(engine, "")))
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## bf16 rounding of Hugging Face's own module", "",
              "Against the same module in fp32 on check-model's probe (4 x 16 tokens, seed "
              "0): the largest log-prob difference with its weights cast to bf16, and with "
              "fp32 weights under bf16 autocast; the relative update error of one AdamW "
              "step (fp32 master weights) under bf16 autocast.", "",
              "| family | bf16 weights log-prob | autocast log-prob | autocast step |",
              "|---|---|---|---|"]
    for family, r in rounding.items():
        step = f"{r['autocast_step']:.2e}" if "autocast_step" in r else "-"
        lines.append(f"| {family} | {r['weights_logprob']:.2e} | "
                     f"{r['autocast_logprob']:.2e} | {step} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "models.md"))
    ns = p.parse_args(argv)
    t0 = time.time()
    results, rounding = {}, {}
    with tempfile.TemporaryDirectory(prefix="graphrl-matrix-") as tmp:
        for family, config in TINY.items():
            with no_progress_bars():
                d = save_random_checkpoint(config, Path(tmp) / family)
            rounding[family] = bf16_rounding(d)
            for precision in ("fp32", "bf16"):
                rows, errors = [], {}
                for group in GROUPS:
                    got, error = check_model(d, precision, list(group))
                    rows += got
                    for e in group[1].split(","):
                        errors[e] = error
                results[(family, precision)] = (rows, errors)
                print(f"{family} {precision}: "
                      + ", ".join(f"{r['engine']} {r['strategy']} {r['status']}"
                                  for r in rows), flush=True)
    atomic_write_text(ns.out, render(results, rounding, time.time() - t0))
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
