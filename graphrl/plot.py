"""`graphrl plot METRICS.jsonl`: a run's curves as one picture.

Four panels over iterations: reward (reward_mean), KL (every metric whose name ends in
`kl`), response length (mean and max), and seconds per call (`seconds/<call>`); a fifth,
held-out evaluation (eval/pass@k, eval/reward_mean, ...), when the run evaluated
(--eval-every, graphrl.evaluation). A panel
whose metrics the file lacks says so instead of drawing nothing silently.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .errors import UsageError

PICTURE_FORMATS = ("png", "svg", "pdf", "jpg")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics file (one JSON object per line), checked."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{path}: no such metrics file")
    from .text_lines import utf8_lines

    rows = []
    for lineno, line in utf8_lines(file):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{path} line {lineno}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or "iteration" not in row:
            raise UsageError(f"{path} line {lineno}: not a metrics row (no 'iteration')")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path}: no metrics rows")
    return rows


def panels(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Panel title -> the metric names it draws."""
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    out = {"reward": [k for k in keys if k == "reward_mean"],
           "KL": [k for k in keys if k.lower().endswith("kl")],
           "response length (tokens)": [k for k in keys if k.startswith("response_length")],
           "seconds per call": [k for k in keys if k.startswith("seconds/")]}
    held_out = [k for k in keys if k.startswith("eval/") and ("pass@" in k or "reward" in k)]
    if held_out:   # --eval-every rows (graphrl.evaluation): only at evaluating iterations
        out["held-out evaluation"] = held_out
    return out


def plot_metrics(path: str, out: str | None = None) -> Path:
    """Draw `path`'s curves into `out` (default: beside it, .png); returns the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .outputs import atomic_write_bytes, check_output_file

    rows = read_metrics(path)
    target = Path(out) if out else Path(path).with_suffix(".png")
    check_output_file("-o" if out else "picture", str(target))
    kind = target.suffix.lstrip(".").lower()
    if kind not in PICTURE_FORMATS:
        raise UsageError(f"-o {target}: unknown picture format {target.suffix or '(none)'!r} "
                         f"(use {', '.join('.' + k for k in PICTURE_FORMATS)})")
    drawn = panels(rows)
    wide = len(drawn) > 4
    fig, axes = plt.subplots(2, 3 if wide else 2, figsize=(16 if wide else 11, 7),
                             constrained_layout=True)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    for ax, (title, names) in zip(axes.flat, drawn.items()):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        for name in names:
            pts = [(r["iteration"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name.split("/")[-1]
                    if title == "seconds per call" else name, lw=1.2,
                    marker="o" if name.startswith("eval/") else None, ms=3)
        if names:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not in this metrics file", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.suptitle(Path(path).name)
    picture = io.BytesIO()
    fig.savefig(picture, dpi=110, format=kind)
    plt.close(fig)
    atomic_write_bytes(target, picture.getvalue())
    return target
