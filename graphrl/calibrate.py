"""Fit the cost model's efficiency factors and overhead floors to measured step times.

    python -m graphrl.calibrate [FILE.jsonl ...] [--check HELDOUT.jsonl ...] [--no-fit]

loads the measurements (one JSON object a line, see benchmarks/data/calibration/
README.md), fits `graphrl.cost.CostParams` by least squares over log(predicted /
measured) with a coordinate (pattern) search in log-parameter space (Hooke & Jeeves 1961;
numpy only),
prints the fitted constants in the form cost.py stores them, and a table of predicted vs
measured time and peak memory with % error for every run, then the same for the held-out
`--check` files (never fitted). `--no-fit` uses the constants stored in cost.py. Without
files it fits the H100 measurements that ship in the repository (the command below).

Time parameters are fitted on run times (all phases at once); memory parameters on the
peak memory of the train (activations, logits) and forward/generate runs (transients);
the captured-engine decode constants on `decode` records (benchmarks/h100_check.py). The
HBM efficiency is read off the first `hw` copy record (measured / datasheet bandwidth).
The constants in cost.py come from

    python -m graphrl.calibrate benchmarks/data/calibration/h100_hf_llama.jsonl \
        benchmarks/data/h100_decode.jsonl --check benchmarks/data/h100_heldout.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .cluster import GiB, GPUType, H100_80G
from .cost import (CALIBRATED, KORTHIKANTI_ACT_BYTES, CallCost, CostParams, estimate,
                   generate_breakdown)
from .parallel import Strategy
from .types import ModelSpec

# The measurements the constants in cost.py are fitted to, as a clone of the repository
# has them (benchmarks/data/calibration/README.md): the default of `python -m
# graphrl.calibrate` without files.
MEASURED = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
DEFAULT_FIT = (MEASURED / "calibration" / "h100_hf_llama.jsonl", MEASURED / "h100_decode.jsonl")
DEFAULT_CHECK = (MEASURED / "h100_heldout.jsonl",)

# Parameters fitted on times, with (low, high) bounds of the search.
TIME_PARAMS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "matmul_eff": (0.1, 0.9),
    "token_layer_flops": (1e5, 1e10),
    "host_call_s": (1e-5, 0.05),
    "host_layer_s": (1e-5, 0.01),
    "overlap_exp": (1.0, 16.0),
    "train_host_layer_s": (1e-5, 0.02),
    "bwd_eff_ratio": (0.2, 1.5),
})
TRAIN_MEMORY_PARAMS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "act_mem_bytes": (1.0, 200.0),
    "logit_train_bytes": (1.0, 64.0),
})
FORWARD_MEMORY_PARAMS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "logit_fwd_bytes": (2.0, 32.0),     # at least the bf16 logits themselves
})
GENERATE_MEMORY_PARAMS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "fwd_transient_bytes": (0.1, 500.0),
})
DECODE_PARAMS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "decode_bw_slowdown": (1.0, 8.0),   # nothing reads memory faster than the bound
    "graph_layer_s": (1e-6, 1e-3),
})


# Where the search starts: first guesses from the literature and the calibration README,
# fixed here so that a refit prints the same constants whatever cost.py stores.
FIT_START = CostParams(
    matmul_eff=0.5,                 # "large passes reach 35-60% of peak" (README)
    hbm_eff=0.85,
    token_layer_flops=5e7,
    host_call_s=1e-3,
    host_layer_s=0.75e-3,           # "~0.75 ms per layer per token step" (README)
    overlap_exp=2.0,
    train_host_layer_s=2e-3,
    bwd_eff_ratio=0.8,
    act_mem_bytes=KORTHIKANTI_ACT_BYTES,   # Korthikanti et al. 2022
    logit_train_bytes=16.0,         # bf16 logits + fp32 copy, log-softmax, grad + bf16 grad
    logit_fwd_bytes=2.0,            # bf16 logits
    fwd_transient_bytes=10.0,
)


@dataclass(frozen=True)
class RunPoint:
    """One measured `run` record."""

    model: str
    phase: str
    batch: int
    seq: int               # sequence length; the prompt length for generate
    new_tokens: int
    seconds: float
    peak_bytes: int

    def label(self) -> str:
        extra = f"+{self.new_tokens}" if self.phase == "generate" else ""
        return f"{self.model} {self.phase} {self.batch}x{self.seq}{extra}"


@dataclass(frozen=True)
class DecodePoint:
    """One measured step of a CUDA-graph-captured decode (a `decode` record): `batch`
    sequences attending over a static cache of `context` positions."""

    model: str
    batch: int
    context: int
    seconds: float
    phase = "decode"
    peak_bytes = 0          # not compared: the step's memory is its own static cache

    def label(self) -> str:
        return f"{self.model} decode b{self.batch} ctx{self.context}"


@dataclass(frozen=True)
class Calibration:
    """What calibration files hold: models by name, runs, decode steps, and the hardware
    ceilings."""

    models: tuple[tuple[str, ModelSpec], ...]
    runs: tuple[RunPoint, ...]
    matmul_tflops: float = 0.0
    copy_gbps_rw: float = 0.0
    decodes: tuple[DecodePoint, ...] = ()

    def model(self, name: str) -> ModelSpec:
        return dict(self.models)[name]

    def merged(self, other: "Calibration") -> "Calibration":
        """Both files' points; a model both describe must have one shape; the first
        file's hardware ceilings win."""
        mine = dict(self.models)
        for name, spec in other.models:
            if mine.setdefault(name, spec) != spec:
                raise ValueError(f"model {name!r} has two different shapes")
        return Calibration(tuple(mine.items()), self.runs + other.runs,
                           self.matmul_tflops or other.matmul_tflops,
                           self.copy_gbps_rw or other.copy_gbps_rw,
                           self.decodes + other.decodes)


def load(path: str | Path) -> Calibration:
    """Parse a calibration jsonl file (kinds env, hw, model, run, decode; runs and
    decode steps marked `oom` are skipped)."""
    models: dict[str, ModelSpec] = {}
    runs: list[RunPoint] = []
    decodes: list[DecodePoint] = []
    tflops = gbps = 0.0
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
        try:
            tflops, gbps = _read_record(rec, path, lineno, models, runs, decodes, tflops, gbps)
        except KeyError as e:
            raise ValueError(f"{path}:{lineno}: {rec.get('kind')} record lacks the field "
                             f"{e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            if str(e).startswith(f"{path}:"):
                raise
            raise ValueError(f"{path}:{lineno}: {rec.get('kind')} record has a field of the "
                             f"wrong type ({e})") from None
    unknown = {r.model for r in [*runs, *decodes]} - set(models)
    if unknown:
        raise ValueError(f"{path}: runs of models without a model record: {sorted(unknown)}")
    return Calibration(tuple(models.items()), tuple(runs), tflops, gbps, tuple(decodes))


def _read_record(rec: dict[str, Any], path: str | Path, lineno: int,
                 models: dict[str, ModelSpec], runs: list[RunPoint],
                 decodes: list[DecodePoint], tflops: float,
                 gbps: float) -> tuple[float, float]:
    """Add one record of a calibration file; returns the (tflops, gbps) seen so far."""
    kind = rec.get("kind")
    if kind == "model":
        spec = ModelSpec("llama", rec["vocab"], rec["hidden_size"], rec["num_hidden_layers"],
                         rec["num_attention_heads"], rec["num_key_value_heads"],
                         rec["intermediate_size"], 2048)
        if "params" in rec and spec.num_params != rec["params"]:
            raise ValueError(f"{path}:{lineno}: model {rec['model']}: ModelSpec counts "
                             f"{spec.num_params} parameters, the file says {rec['params']}")
        models[rec["model"]] = spec
    elif kind in ("run", "decode") and rec.get("oom"):
        pass
    elif kind == "decode":
        decodes.append(DecodePoint(rec["model"], rec["batch"], rec["context"],
                                   float(rec["s_step"])))
    elif kind == "run":
        generate = rec["phase"] == "generate"
        runs.append(RunPoint(rec["model"], rec["phase"], rec["batch"],
                             rec["prompt"] if generate else rec["seq"],
                             rec.get("new", 0) if generate else 0,
                             float(rec["s"]), int(rec["peak_gib"] * GiB)))
    elif kind == "hw" and rec.get("what", "").startswith("bf16_matmul"):
        tflops = float(rec["tflops"])
    elif kind == "hw" and rec.get("what", "").startswith("d2d_copy"):
        gbps = float(rec["gbps_rw"])
    return tflops, gbps


def load_all(paths: Sequence[str | Path]) -> Calibration:
    """The points of every file, merged (see Calibration.merged)."""
    cals = [load(p) for p in paths]
    out = cals[0]
    for c in cals[1:]:
        out = out.merged(c)
    return out


def predict(cal: Calibration, point: RunPoint, params: CostParams = CALIBRATED,
            gpu: GPUType = H100_80G) -> CallCost:
    """The model's prediction for one measured run (one GPU, HF eager engine)."""
    return estimate(cal.model(point.model), point.phase, point.batch, point.seq, Strategy(),
                    gpu, new_tokens=point.new_tokens, engine="hf", params=params,
                    forward_kv_cache=True)


def predict_decode(cal: Calibration, point: DecodePoint, params: CostParams = CALIBRATED,
                   gpu: GPUType = H100_80G) -> float:
    """The model's seconds for one decode step of a graph-captured engine (one GPU)."""
    return generate_breakdown(cal.model(point.model), point.batch, point.context, 0,
                              Strategy(), gpu, "graph", params=params)["decode_step"]


def _log_errors(cal: Calibration, points: Sequence[RunPoint | DecodePoint],
                params: CostParams, what: str, gpu: GPUType) -> np.ndarray:
    out = []
    for p in points:
        if isinstance(p, DecodePoint):
            pred, meas = predict_decode(cal, p, params, gpu), p.seconds
        else:
            cost = predict(cal, p, params, gpu)
            pred, meas = ((cost.seconds, p.seconds) if what == "time"
                          else (cost.peak_memory_bytes, p.peak_bytes))
        out.append(math.log(pred / meas))
    return np.asarray(out)


def pattern_search(objective: Callable[[dict[str, float]], float], start: dict[str, float],
                   bounds: Mapping[str, tuple[float, float]], step: float = 0.5,
                   tol: float = 1e-4, max_rounds: int = 2000) -> dict[str, float]:
    """Minimise `objective` over positive parameters by coordinate moves of x *= exp(+-step),
    halving the step when no coordinate improves (Hooke & Jeeves 1961, simplified)."""
    x = dict(start)
    best = objective(x)
    for _ in range(max_rounds):
        if step < tol:
            break
        improved = False
        for name, (lo, hi) in bounds.items():
            for sign in (1.0, -1.0):
                trial = dict(x)
                trial[name] = min(max(x[name] * math.exp(sign * step), lo), hi)
                if trial[name] == x[name]:
                    continue
                val = objective(trial)
                if val < best - 1e-12:
                    x, best, improved = trial, val, True
                    break
        if not improved:
            step /= 2
    return x


def _fit_group(cal: Calibration, points: Sequence[RunPoint], params: CostParams,
               bounds: Mapping[str, tuple[float, float]], what: str, gpu: GPUType,
               restarts: int = 20) -> CostParams:
    if not points:
        return params

    def objective(values: dict[str, float]) -> float:
        errs = _log_errors(cal, points, params.with_values(values), what, gpu)
        # Least squares plus a smooth L4 term that weighs the worst points up (a max
        # term would make the objective non-smooth, which stalls a coordinate search).
        return float(np.mean(errs ** 2) + 10.0 * np.mean(errs ** 4))

    x = {name: getattr(params, name) for name in bounds}
    best = objective(x)
    for _ in range(restarts):   # restart with a full step until it stops paying
        x = pattern_search(objective, x, bounds)
        val = objective(x)
        if val > best - 1e-9:
            break
        best = val
    return params.with_values(x)


def fit(cal: Calibration, start: CostParams = FIT_START, gpu: GPUType = H100_80G) -> CostParams:
    """Fitted constants for the runs in `cal` (`gpu` is the kind they were measured on)."""
    params = start
    bounds = dict(TIME_PARAMS)
    if cal.copy_gbps_rw:
        params = params.with_values({"hbm_eff": cal.copy_gbps_rw * 1e9 / gpu.hbm_bandwidth})
    if cal.matmul_tflops:   # no call's matmuls beat the measured matmul ceiling
        ceiling = cal.matmul_tflops * 1e12 / gpu.peak_bf16_flops
        bounds["matmul_eff"] = (bounds["matmul_eff"][0], ceiling)
        params = params.with_values({"matmul_eff": min(params.matmul_eff, ceiling)})
    params = _fit_group(cal, cal.runs, params, bounds, "time", gpu)
    train = [p for p in cal.runs if p.phase == "train"]
    params = _fit_group(cal, train, params, TRAIN_MEMORY_PARAMS, "memory", gpu)
    # The prefill transient is fitted on generate runs (whose logits are one position),
    # then the forward's logit bytes on forward runs.
    gen = [p for p in cal.runs if p.phase == "generate"]
    params = _fit_group(cal, gen, params, GENERATE_MEMORY_PARAMS, "memory", gpu)
    fwd = [p for p in cal.runs if p.phase == "forward"]
    params = _fit_group(cal, fwd, params, FORWARD_MEMORY_PARAMS, "memory", gpu)
    return _fit_group(cal, cal.decodes, params, DECODE_PARAMS, "time", gpu)


@dataclass(frozen=True)
class Row:
    point: RunPoint | DecodePoint
    predicted_s: float
    predicted_bytes: int

    @property
    def time_error(self) -> float:
        return self.predicted_s / self.point.seconds - 1.0

    @property
    def memory_error(self) -> float | None:
        if not self.point.peak_bytes:
            return None
        return self.predicted_bytes / self.point.peak_bytes - 1.0


def compare(cal: Calibration, params: CostParams = CALIBRATED,
            gpu: GPUType = H100_80G) -> list[Row]:
    rows = []
    for p in cal.runs:
        cost = predict(cal, p, params, gpu)
        rows.append(Row(p, cost.seconds, cost.peak_memory_bytes))
    rows += [Row(d, predict_decode(cal, d, params, gpu), 0) for d in cal.decodes]
    return rows


def constants_text(params: CostParams) -> str:
    return "\n".join(f"FITTED_{name.upper()} = {value:.4g}"
                     for name, value in params.as_dict().items())


def table_text(rows: Iterable[Row]) -> str:
    rows = list(rows)
    lines = [f"{'run':<34} {'meas s':>9} {'pred s':>9} {'err':>7}   "
             f"{'meas GiB':>8} {'pred GiB':>8} {'err':>7}"]
    for r in rows:
        memory = ("" if r.memory_error is None else
                  f"   {r.point.peak_bytes / GiB:8.2f} {r.predicted_bytes / GiB:8.2f} "
                  f"{100 * r.memory_error:+6.1f}%")
        lines.append(f"{r.point.label():<34} {r.point.seconds:9.4f} {r.predicted_s:9.4f} "
                     f"{100 * r.time_error:+6.1f}%{memory}")
    for phase in sorted({r.point.phase for r in rows}):
        sel = [r for r in rows if r.point.phase == phase]
        mem = [abs(r.memory_error) for r in sel if r.memory_error is not None]
        lines.append(f"worst {phase:<9} time {100 * max(abs(r.time_error) for r in sel):5.1f}%"
                     + (f"   memory {100 * max(mem):5.1f}%" if mem else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphrl.calibrate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", metavar="FILE.jsonl",
                        help="measurements to fit (default: the H100 measurements of a "
                             "clone of the repository, benchmarks/data/calibration/"
                             "h100_hf_llama.jsonl and benchmarks/data/h100_decode.jsonl, "
                             "with --check benchmarks/data/h100_heldout.jsonl)")
    parser.add_argument("--check", action="append", default=[], metavar="FILE.jsonl",
                        help="held-out measurements: predicted and compared, never fitted")
    parser.add_argument("--no-fit", action="store_true",
                        help="use the constants stored in cost.py instead of fitting")
    args = parser.parse_args(argv)
    if not args.paths:
        missing = [str(p) for p in DEFAULT_FIT + DEFAULT_CHECK if not p.is_file()]
        if missing:
            print(f"python -m graphrl.calibrate: error: no FILE.jsonl given and the "
                  f"repository's measurements are not here ({', '.join(missing)}): give "
                  "the files to fit", file=sys.stderr)
            return 2
        args.paths = [str(p) for p in DEFAULT_FIT]
        args.check = args.check or [str(p) for p in DEFAULT_CHECK]
    try:
        cal = load_all(args.paths)
        held_out = load_all(args.check) if args.check else None
    except (OSError, ValueError, KeyError) as e:
        print(f"python -m graphrl.calibrate: error: {e}", file=sys.stderr)
        return 2
    params = CALIBRATED if args.no_fit else fit(cal)
    if not args.no_fit:
        print("# fitted constants (paste into graphrl/cost.py)")
        print(constants_text(params))
        print()
    print(table_text(compare(cal, params)))
    if held_out is not None:
        print("\n# held out (not fitted)")
        print(table_text(compare(held_out, params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
