"""Streamed scoring: the training pool starts on a batch's head-finished groups.

With `--staleness 1` and streamed generation (backends/stream_generation.py) a batch's
sequences that finish within their first `stream_cut` response tokens are complete at
the end of the head, before the weight push; the rest finish in the tail, after it.
Training on batch n happens in the next step; AReaL (Fu et al. 2025, arXiv 2505.24298,
§4-5) starts training as soon as enough finished samples are in its buffer. Here the
training pool starts on batch n's finished part while the generation pool runs batch n's
tail, without changing any result:

- The head part is fixed by a rule, never by wall-clock: the GRPO groups (the `samples`
  consecutive sequences of one prompt; one sequence when samples = 1) whose sequences
  all have at most `stream_cut` response tokens. A sequence that was cut at the head
  always samples at least one more token in its tail, so "final length <= cut" is
  exactly "finished within the head", and every backend computes the same part from the
  rollout alone.
- A call may run on the head part early only where that is exact: a `forward` (per-row:
  each row's output depends on its own row and the weights) that reads only the
  streamed rollout of the previous step and weights that are step inputs (with
  staleness 1 nothing updates them between the end of the step's train and the next
  step's use). Such nodes are marked `head_part=true` by the staleness rewrite; at the
  next step they compute only the rest of the rows, and their output is both parts put
  back in row order — the same payload as the unsplit call (forwards are row-wise; up to
  float summation order inside a batched matmul).
- Everything else waits for the whole batch, and `split_report` says why: ops (cheap,
  host), trains. A train may not split where it takes more than one optimizer pass
  (epochs x minibatches > 1: its first update needs rows of both parts), or reads an
  advantage normalised over the whole batch (gae with whiten=true); where neither
  holds, splitting it would need gradient accumulation across the two parts, which the
  executors do not do yet (reported as such).

The step this gives (graphrl/stream_cost.py prices it) with H/T the head/tail of the
generation pool, P the push, W_A the training pool's calls on the head part of batch n
and W_B the rest of its step on batch n - 1:

    step = max(H, W_B) + P + max(T, W_A)

(the head overlaps W_B as before; after the push the tail overlaps W_A).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

HEAD_PART = "head_part"   # node attribute: the call runs on the head part early


def head_finished(lengths: Sequence[int], cut: int, samples: int) -> list[bool]:
    """Per sequence: whether its group (`samples` consecutive sequences) finished within
    the head, i.e. every sequence of it has at most `cut` response tokens."""
    n = len(lengths)
    g = max(int(samples), 1)
    if n % g:
        raise ValueError(f"head part: {n} sequences do not form groups of {g}")
    out: list[bool] = []
    for i in range(0, n, g):
        done = all(int(x) <= int(cut) for x in lengths[i:i + g])
        out += [done] * g
    return out


@dataclass(frozen=True)
class SplitReport:
    """Which of the training pool's calls start on the head part, and why the others
    wait for the whole batch."""

    gen: str
    calls: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]   # (node, reason)

    def lines(self) -> list[str]:
        out = [f"head part of {self.gen} (groups finished within stream_cut): "
               + (", ".join(self.calls) if self.calls else "no call") + " start(s) early"]
        out += [f"  {name} waits for the whole batch: {why}" for name, why in self.refused]
        return out


def _train_refusal(g: Any, n: Any) -> str:
    passes = int(n.attr("epochs", 1)) * int(n.attr("minibatches", 1))
    if passes > 1:
        return (f"epochs={n.attr('epochs', 1)} x minibatches={n.attr('minibatches', 1)}: "
                "more than one optimizer pass, whose first update needs rows of both parts")
    producers = g.producers()
    for i in n.inputs[1:]:
        p = producers.get(i)
        if p is not None and p.target == "gae" and p.attr("whiten", True):
            return (f"reads {i} from {p.name} (gae, whiten=true): advantages normalised "
                    "over the whole batch")
    return ("exact here (one optimizer pass, per-group/per-sequence advantages), but "
            "gradient accumulation over the two parts is not built in the executors")


def mark_head_parts(g: Any, k: int) -> Any:
    """`g` (rewritten by passes/staleness.carry_rollouts with streaming) with the calls
    that may run on the head part early marked `head_part=true` (module doc)."""
    from dataclasses import replace

    from .graph import CALL

    if k != 1:
        return g
    report = split_report(g, k, marked=False)
    if report is None or not report.calls:
        return g
    nodes = tuple(replace(n, attrs=tuple(sorted(n.attrs + ((HEAD_PART, True),))))
                  if n.name in report.calls and n.kind == CALL else n for n in g.nodes)
    return replace(g, nodes=nodes)


def split_report(g: Any, k: int, marked: bool = True) -> SplitReport | None:
    """The SplitReport of a rewritten graph (None without a streamed generate node);
    `marked`: take the calls from their `head_part` marks (else decide them)."""
    from .graph import CALL

    gens = [n for n in g.nodes if n.target == "generate" and n.attr("stream_cut")]
    if len(gens) != 1:
        return None
    gen = gens[0]
    feeds = {src: dst for dst, src in g.carries}
    streamed = {feeds[v.name] for v in gen.outputs if v.name in feeds}
    step_inputs = {v.name for v in g.inputs}
    calls, refused = [], []
    for n in g.nodes:
        if n.kind != CALL or n is gen or not any(i in streamed for i in n.inputs):
            continue
        if marked:
            if n.attr(HEAD_PART):
                calls.append(n.name)
                continue
        if k != 1:
            why = f"staleness {k}: weights change between the head and the train's step"
        elif n.target == "forward":
            data_ok = all(i in streamed for i in n.inputs[1:])
            if data_ok and n.inputs[0] in step_inputs:
                calls.append(n.name)
                continue
            why = ("reads values other than the streamed rollout" if not data_ok else
                   f"reads weights {n.inputs[0]} made inside the step")
        elif n.target == "train":
            why = _train_refusal(g, n)
        else:
            why = f"{n.target} is not a per-row call"
        refused.append((n.name, why))
    return SplitReport(gen.name, tuple(calls), tuple(refused))


__all__ = ["HEAD_PART", "SplitReport", "head_finished", "mark_head_parts", "split_report"]
