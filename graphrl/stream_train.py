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
- A node may run on the head part early only where that is exact; the staleness rewrite
  marks such nodes `head_part=true`:
  * a `forward` (per-row: each row's output depends on its own row and the weights)
    reading only the streamed rollout of the previous step and weights that are step
    inputs (with staleness 1 nothing updates them between the end of the step's train
    and the next step's use);
  * an op known to be per group or per row (ROW_OPS: GRPO's group advantages, whose
    groups lie within the head part's; GAE without whitening) on such inputs, when a
    train that starts early reads it;
  * a `train` with one optimizer pass (epochs x minibatches = 1) on such inputs: the
    head part's gradient is kept, the rest's added at the next step, each weighted by
    its share of the batch's loss tokens, and one optimizer step taken
    (backends/engines/train_loop.TwoParts) — the unsplit update up to float order.
  Each marked node's output is both parts put back in row order.
  Memory: between the two parts the training engine holds a copy of the head part's
  gradient (its gradients' bytes, sharded as they are); the compiler keeps a train whole
  where its GPUs cannot hold that copy too (passes/price_stream.no_room_for_gradient_copy).
- Everything else waits for the whole batch, and `split_report` says why: a train with
  more than one optimizer pass (its first update needs rows of both parts), one reading
  an advantage normalised over the whole batch (gae with whiten=true), any op not known
  to be per-row.

The step this gives (graphrl/stream_cost.py prices it) with H/T the head/tail of the
generation pool, P the push, W_A the training pool's calls on the head part of batch n
and W_B the rest of its step on batch n - 1 (W_A also holds the head part of a train that
starts early; its optimizer step is in W_B):

    step = max(H, W_B) + P + max(T, W_A)

(the head overlaps W_B as before; after the push the tail overlaps W_A).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

HEAD_PART = "head_part"   # node attribute: the call runs on the head part early
# attributes of a streamed generate node that the compiler priced (passes/price_stream.py)
# and passes/lower.py turns into instructions: the generation pool's head
# and tail seconds (graphrl/stream_cost.py), and the head part's share of the marked
# calls' work (stream_cost.head_share; absent: no call starts early)
HEAD_SECONDS, TAIL_SECONDS, HEAD_SHARE = "head_seconds", "tail_seconds", "head_share"


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


ROW_OPS = ("group_advantages", "gae")   # ops whose rows depend on their own group only


def _op_refusal(n: Any, samples: int) -> str:
    if n.target == "group_advantages":
        if n.attr("scale", "group") == "batch":
            return "scale=batch: advantages divided by the whole batch's std"
        g = int(n.attr("group_size", 1))
        return "" if g >= 1 and samples % g == 0 else (
            f"group_size={g} groups do not lie within the head part's groups of {samples}")
    if n.target == "gae":
        return ("whiten=true: advantages normalised over the whole batch"
                if n.attr("whiten", True) else "")
    return f"op {n.target} is not known to be per-row"


def _train_refusal(n: Any, inputs_ok: dict[str, str]) -> str:
    passes = int(n.attr("epochs", 1)) * int(n.attr("minibatches", 1))
    if passes > 1:
        return (f"epochs={n.attr('epochs', 1)} x minibatches={n.attr('minibatches', 1)}: "
                "more than one optimizer pass, whose first update needs rows of both parts")
    for i in n.inputs[1:]:
        if inputs_ok.get(i):
            return f"reads {i}, which waits for the whole batch ({inputs_ok[i]})"
    return ""


def mark_head_parts(g: Any, k: int) -> Any:
    """`g` (rewritten by passes/staleness.carry_rollouts with streaming) with the calls
    that may run on the head part early marked `head_part=true` (module doc)."""
    from dataclasses import replace

    if k != 1:
        return g
    report = split_report(g, k, marked=False)
    if report is None or not report.calls:
        return g
    nodes = tuple(replace(n, attrs=tuple(sorted(n.attrs + ((HEAD_PART, True),))))
                  if n.name in report.calls else n for n in g.nodes)
    return replace(g, nodes=nodes)


def split_report(g: Any, k: int, marked: bool = True) -> SplitReport | None:
    """The SplitReport of a rewritten graph (None without a streamed generate node);
    `marked`: take the calls from their `head_part` marks (else decide them)."""
    from .graph import CALL, OP

    gens = [n for n in g.nodes if n.target == "generate" and n.attr("stream_cut")]
    if len(gens) != 1:
        return None
    gen = gens[0]
    samples = int(gen.attr("samples", 1))
    feeds = {src: dst for dst, src in g.carries}
    streamed = {feeds[v.name] for v in gen.outputs if v.name in feeds}
    step_inputs = {v.name for v in g.inputs}
    why_not: dict[str, str] = {}   # value -> why it waits for the whole batch ("" if not)
    split: list[str] = []
    refused: list[tuple[str, str]] = []
    for n in g.nodes:
        data = [i for i in n.inputs if not (i in step_inputs and i not in streamed
                                            and g.value(i).spec.is_weights)]
        if n is gen or n.kind not in (CALL, OP) or not any(
                i in streamed or i in why_not for i in data):
            continue
        if k != 1:
            why = f"staleness {k}: weights change between the head and the train's step"
        else:
            late = next((f"reads {i}, which waits for the whole batch" for i in data
                         if i not in streamed and why_not.get(i, "x")), "")
            if n.kind == OP:
                why = _op_refusal(n, samples) or late
            elif n.target == "forward":
                why = late or ("" if n.inputs[0] in step_inputs else
                               f"reads weights {n.inputs[0]} made inside the step")
            elif n.target == "train":
                why = _train_refusal(n, {i: why_not.get(i, "") for i in data}) or late
            else:
                why = f"{n.target} is not a per-row call"
        for v in n.outputs:
            why_not[v.name] = why or ""
        if not why:
            split.append(n.name)
        elif n.kind == CALL:
            refused.append((n.name, why))
    # an op starts early only for a train that does (alone it saves nothing)
    trains = [n for n in split if g.node(n).target == "train"]
    needed = set()
    for t in trains:
        stack = list(g.node(t).inputs)
        producers = g.producers()
        while stack:
            p = producers.get(stack.pop())
            if p is not None and p.name in split and p.name not in needed:
                needed.add(p.name)
                stack += list(p.inputs)
    calls = tuple(n for n in split if g.node(n).kind == CALL or n in needed)
    if marked:   # what the compiler kept (passes/price_stream.py may unmark)
        calls = tuple(n.name for n in g.nodes if n.attr(HEAD_PART))
    return SplitReport(gen.name, calls, tuple(refused))


__all__ = ["HEAD_PART", "HEAD_SECONDS", "HEAD_SHARE", "SplitReport", "TAIL_SECONDS",
           "head_finished", "mark_head_parts", "split_report"]
