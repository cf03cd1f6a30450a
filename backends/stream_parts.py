"""A batch's head part and the rest, as executors split a `head_part` call
(graphrl/stream_train.py): which sequences form the head part (groups whose responses all
have at most `stream_cut` tokens, read from the rollout), their rows, and a payload put
back together in row order. Used by the local backend (both parts in one step, in order)
and the Ray backend (the head part during the previous step's tail)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from graphrl.graph import Graph, Node


def stream_source(graph: Graph) -> Optional[Node]:
    """The streamed generate node whose rollouts `head_part` calls read (None: none)."""
    gens = [n for n in graph.nodes if n.target == "generate" and n.attr("stream_cut")]
    return gens[0] if len(gens) == 1 else None


def cut_and_samples(gen: Node) -> tuple[int, int]:
    """The token count within which a sequence finished in the head, and the group size."""
    cut = min(int(gen.attr("stream_cut")), max(int(gen.attr("max_new_tokens", 1)), 1))
    return cut, int(gen.attr("samples", 1))


def head_mask(rollout: Mapping[str, Any], cut: int, samples: int) -> Any:
    """[n] bool: the sequence's group finished within the head (stream_train rule)."""
    import torch

    from graphrl.stream_train import head_finished

    lengths = rollout["response_mask"].sum(dim=1).round().long().tolist()
    return torch.tensor(head_finished(lengths, cut, samples), dtype=torch.bool)


def take_rows(payload: Mapping[str, Any], index: Any) -> dict[str, Any]:
    return {f: t[index] for f, t in payload.items()}


def put_rows(total: int, parts: list[tuple[Any, Mapping[str, Any]]]) -> dict[str, Any]:
    """A payload of `total` rows from (row index, payload of those rows) parts."""
    import torch

    first = next(p for _, p in parts)
    out = {f: torch.zeros((total,) + tuple(t.shape[1:]), dtype=t.dtype)
           for f, t in first.items()}
    for index, p in parts:
        for f, t in p.items():
            out[f][index] = t.to(out[f].device)
    return out


def split_forward(engine: Any, rollout: Mapping[str, Any], cut: int, samples: int
                  ) -> dict[str, Any]:
    """The local backend's `head_part` forward: the head part, then the rest, each a
    forward of its own rows, put back in row order."""
    mask = head_mask(rollout, cut, samples)
    parts = []
    for index in parts_of(mask):
        if index.numel():
            parts.append((index, engine.forward(take_rows(rollout, index))))
    return put_rows(int(mask.numel()), parts)


def parts_of(mask: Any) -> list[Any]:
    """The row indices of the head part and of the rest (each may be empty)."""
    import torch

    return [torch.nonzero(mask)[:, 0], torch.nonzero(~mask)[:, 0]]


def split_op(fn: Any, args: list[Any], attrs: Mapping[str, Any], mask: Any) -> list[Any]:
    """A `head_part` op (per-row or per-group: stream_train.ROW_OPS) run on the head part
    and on the rest, each output put back in row order."""
    outs = []
    for index in parts_of(mask):
        if index.numel():
            out = fn(*[take_rows(a, index) for a in args], **attrs)
            outs.append((index, list(out) if isinstance(out, tuple) else [out]))
    return [put_rows(int(mask.numel()), [(i, o[k]) for i, o in outs])
            for k in range(len(outs[0][1]))]


def split_train(engine: Any, inputs: Mapping[str, Mapping[str, Any]], mask: Any,
                **kw: Any) -> dict[str, float]:
    """A `head_part` train: the head part's gradient, then the rest's and one optimizer
    step (train_loop.TwoParts); the whole batch at once where a part is empty."""
    a, b = parts_of(mask)
    if not a.numel() or not b.numel():
        return engine.train(inputs, **kw)
    engine.train({k: take_rows(p, a) for k, p in inputs.items()}, part="head", **kw)
    return engine.train({k: take_rows(p, b) for k, p in inputs.items()}, part="rest", **kw)


__all__ = ["cut_and_samples", "head_mask", "parts_of", "put_rows", "split_forward",
           "split_op", "split_train", "stream_source", "take_rows"]
