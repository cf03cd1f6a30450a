"""The Ray executor's part of streamed scoring and training (graphrl/stream_train.py): the
`head_part` nodes of step n + 1 start on batch n's head part during step n's tail.

- `early_calls`: right after a streamed head is issued on a generation rank, a
  `stream_early` call there returns the rank's head-finished groups (rows of the rollout,
  their behaviour log-probs and sequence indices) as soon as the head ends — before the
  push and the tail, which the rank's actor runs after it.
- `issue_head_parts`: once the step's other instructions (the train, the push, the tail)
  are issued, the driver waits (with the executor's timeout) for those rows and runs the
  `head_part` nodes on them in graph order: forwards are issued on their ranks, ops run
  on the driver once their inputs arrived, a train's head part (train_loop.TwoParts,
  part="head": gradient kept, no optimizer step) is issued on its ranks, each between
  the plan's onload and offload of its early part where its GPUs offload (passes/
  lower_stream.py). The training pool's actors run them after the step's train and
  push, beside the tail; results stay Ray objects (and engine state) for the next step.
- `run_rest` / `run_train_rest` / `split_host_op`: at the next step a `head_part` node
  computes the other rows — a forward's output is both parts in row order (a zero-CPU
  Ray task puts them together, so the driver does not wait), a train takes its rest and
  the one optimizer step (part="rest"), an op runs on both parts on the driver. The head
  part is recomputed there, as the local backend does, when the early result is missing
  (the first step after a restart) or was computed with other weights; a train whose
  engine takes no parts (DeepSpeed) or whose parts do not split over its data-parallel
  ranks runs whole (the compiler prices DeepSpeed trains whole).
The head part is the same rows as the local backend's (stream_parts.head_mask, checked).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from graphrl.errors import ExecutionError, OpError
from graphrl.graph import Node
from graphrl.stream_train import HEAD_PART

from .specs import CallSpec, InputSpec, with_loss


def _state(ex: Any) -> dict[str, Any]:
    return ex.__dict__.setdefault("_head_parts", {"early": {}, "done": {}})


def split_calls(ex: Any) -> list[Node]:
    """The graph's `head_part` nodes, in order."""
    return [n for n in ex.graph.nodes if n.attr(HEAD_PART)]


def early_calls(ex: Any, n: Node, ranks: list[tuple[int, tuple[int, int]]],
                common: Mapping[str, Any]) -> None:
    """After streamed head `n` on `ranks` (rank, prompt rows): ask each rank for its
    head-finished groups (nothing to do without `head_part` calls or with noop engines)."""
    if ex.noop or not split_calls(ex):
        return
    refs = []
    for rank, (lo, hi) in ranks:
        cs = CallSpec(inputs=(), rows=(lo, hi), **dict(common, method="stream_early"))
        refs.append(ex._submit(rank, "run", n, cs))
    _state(ex)["early"][n.name] = (common["iteration"], refs)


def _issue_forward(ex: Any, n: Node, payload: Mapping[str, Any], iteration: int,
                   make_value: Any) -> Optional[Any]:
    """Forward call `n` on the rows of `payload` over its mesh (as RayExecutor._run_call
    splits a batch); None where an FSDP mesh has more ranks than rows."""
    from .assign import split_rows

    key = ex.engines.node_engine[n.name]
    spec = ex.engines.specs[key]
    ranks = n.placement.mesh.gpus
    m = int(next(iter(payload.values())).shape[0])
    whole, collective = spec.kind in ("megatron", "deepspeed"), spec.kind == "fsdp"
    if collective and m < len(ranks):
        return None
    v = make_value(local=dict(payload))
    ex._to_refs(v)
    common = dict(node=n.name, call=n.call, model=n.model, method="forward", engine=key,
                  attrs=(), seed=0, iteration=iteration, output=n.outputs[0].spec)
    results, stamps, bounds = [], [], []
    for i, rank in enumerate(ranks):
        lo, hi = (0, m) if whole else split_rows(m, len(ranks), i)
        if hi == lo:
            continue
        cs = CallSpec(inputs=(InputSpec(1, 0),), rows=(lo, hi), total=m, **common)
        r, s = ex._submit(rank, "run", n, cs, v.parts[0])
        results.append(r)
        stamps.append(s)
        bounds.append((lo, hi))
    if whole:
        results, bounds = results[:1], bounds[:1]
    return make_value(parts=results, bounds=bounds, stamps=stamps)


TRAIN_KINDS = ("fsdp", "replicas", "megatron")   # trains that take part="head"/"rest"


def _issue_train(ex: Any, n: Node, payloads: list[Mapping[str, Any]], index: Any,
                 part: str, iteration: int, make_value: Any, seed_iteration: int = -1
                 ) -> Optional[tuple[list, list]]:
    """Train call `n` on rows `index` of its inputs, part `part` (train_loop.TwoParts),
    seeded as the train of `seed_iteration` (default `iteration`); None where the rows
    do not split over its data-parallel ranks."""
    from graphrl.backends.engines.hf import seed_for

    key = ex.engines.node_engine[n.name]
    ranks = n.placement.mesh.gpus
    if index.numel() % n.placement.strategy.dp:   # data-parallel rows (megatron: of dp)
        return None
    vals = [make_value(local={f: t[index] for f, t in p.items()}) for p in payloads]
    for v in vals:
        ex._to_refs(v)
    attrs = with_loss(tuple((k, v) for k, v in n.attrs
                            if k not in ("behaviour", "staleness", HEAD_PART)),
                      ex.program) + (("part", part),)
    results, stamps = [], []
    for i, rank in enumerate(ranks):
        cs = CallSpec(node=n.name, call=n.call, model=n.model, method="train", engine=key,
                      attrs=attrs, seed=seed_for(ex.seed, iteration if seed_iteration < 0
                                                 else seed_iteration, n.name),
                      iteration=iteration, inputs=tuple(InputSpec(1) for _ in vals),
                      shard=(i, len(ranks)) if len(ranks) > 1 else None,
                      output=n.outputs[1].spec)
        r, s = ex._submit(rank, "run", n, cs, *[v.parts[0] for v in vals])
        results.append(r)
        stamps.append(s)
    return results, stamps


def _local(ex: Any, v: Any, name: str) -> Any:
    return ex._resolve(v, name) if hasattr(v, "token") else v


def issue_head_parts(ex: Any, iteration: int, make_value: Any) -> None:
    """Run every `head_part` node on this step's head part (module doc): forwards and
    trains are issued on their ranks, ops run here once their inputs arrived."""
    import ray
    import torch

    st = _state(ex)
    feeds = {src: dst for dst, src in ex.graph.carries}
    for name, (it, refs) in sorted(st["early"].items()):
        del st["early"][name]
        ex._await([s for _, s in refs], f"the head part of {name}")
        got = ray.get([r for r, _ in refs], timeout=ex.timeout_s)
        index = torch.cat([g["index"] for g in got])
        rows = [g for g in got if g["index"].numel()]
        if not rows:
            continue
        gen = ex.graph.node(name)
        cat = lambda key: {f: torch.cat([r[key][f] for r in rows])  # noqa: E731
                           for f in rows[0][key]}
        env: dict[str, Any] = {feeds[gen.outputs[0].name]: cat("rollout"),
                               feeds[gen.outputs[1].name]: cat("behaviour"),
                               feeds[gen.outputs[2].name]: {"version": torch.full(
                                   (int(index.numel()),), int(rows[0]["version"]),
                                   dtype=torch.int64)}}
        for n in split_calls(ex):
            if any(i not in env for i in n.inputs[1:]):
                break   # an earlier node of the part did not start early
            key = ex.engines.node_engine.get(n.name)
            if n.kind == "op":
                args = [_local(ex, env[i], i) for i in n.inputs]
                attrs = {k: v for k, v in n.attr_dict.items() if k != HEAD_PART}
                try:
                    out = ex.program.ops[n.target].fn(*args, **attrs)
                except OpError as e:   # an op's user code (a reward): add the iteration
                    raise e.at(it) from e
                for v, r in zip(n.outputs, out if isinstance(out, tuple) else (out,)):
                    env[v.name] = r
                continue
            _early_memory(ex, n, "onload", iteration)   # the plan's, around the early part
            try:
                if n.target == "forward":
                    v = _issue_forward(ex, n, env[n.inputs[1]], it, make_value)
                    if v is None:
                        break
                    env[n.outputs[0].name] = v
                    st["done"][n.name] = (it, ex.versions[key], index, v)
                elif n.target == "train" and ex.engines.specs[key].kind in TRAIN_KINDS:
                    payloads = [_local(ex, env[i], i) for i in n.inputs[1:]]
                    whole = torch.arange(int(index.numel()))
                    if _issue_train(ex, n, payloads, whole, "head", it, make_value, it + 1):
                        st["done"][n.name] = (it, ex.versions[key], index, None)
            finally:
                _early_memory(ex, n, "offload", iteration)


def _early_memory(ex: Any, n: Node, op: str, iteration: int) -> None:
    """The plan's `op` (onload / offload) instructions of `n`'s early part (passes/
    lower_stream.py), on their ranks, in issue order around the early call."""
    from .assign import Group

    members = tuple((w, i) for w, i in ex.plan.instrs()
                    if i.op == op and i.node == n.name and i.part == "early")
    if members:
        ex._memory_op(Group(f"{op}:{n.name}:early", op, members), iteration)


def split_host_op(ex: Any, n: Node, args: list[Any]) -> tuple[Any, ...]:
    """A `head_part` op on the driver: on the head part and the rest (as locally)."""
    from graphrl.backends.stream_parts import (cut_and_samples, head_mask, split_op,
                                               stream_source)

    rollout = next(a for a in args if "response_mask" in a)
    attrs = {k: v for k, v in n.attr_dict.items() if k != HEAD_PART}
    mask = head_mask(rollout, *cut_and_samples(stream_source(ex.graph)))
    return tuple(split_op(ex.program.ops[n.target].fn, args, attrs, mask))


def run_train_rest(ex: Any, n: Node, env: dict[str, Any], iteration: int,
                   make_value: Any) -> None:
    """A `head_part` train at the step after its batch's head: the rest of the rows and
    the optimizer step (its head part too where no valid early part exists); the whole
    batch at once where the engine or the data-parallel split cannot take parts."""
    from graphrl.backends.local import WeightsToken
    from graphrl.backends.stream_parts import (cut_and_samples, head_mask, parts_of,
                                               stream_source)

    key = ex.engines.node_engine[n.name]
    token = ex._weights(n, env, key)
    payloads = [ex._resolve(env[i], i) for i in n.inputs[1:]]
    named = dict(zip(ex.program.loss(n.attr("loss")).input_names(len(payloads)), payloads))
    a, b = parts_of(head_mask(named["rollout"], *cut_and_samples(stream_source(ex.graph))))
    early = _state(ex)["done"].pop(n.name, None)
    dp = n.placement.strategy.dp
    if ex.engines.specs[key].kind not in TRAIN_KINDS or not a.numel() or not b.numel() \
            or a.numel() % dp or b.numel() % dp:
        ex._run_call(n, env, iteration)
        return
    if n.attr("staleness") is not None:   # async train: samples within the bound
        from graphrl.backends.async_steps import check_versions

        check_versions(n, {"versions": named["versions"]}, token.version,
                       int(n.attr("staleness")))
    import torch

    if not (early is not None and early[0] == iteration - 1 and early[1] == token.version
            and torch.equal(early[2], a)):
        _issue_train(ex, n, payloads, a, "head", iteration, make_value)
    results, stamps = _issue_train(ex, n, payloads, b, "rest", iteration, make_value)
    ex.versions[key] += 1
    env[n.outputs[0].name] = make_value(token=WeightsToken(n.model, token.version + 1))
    env[n.outputs[1].name] = make_value(parts=results, stamps=stamps, mean=True)


def _combine(total: int, count: int, index_a: Any, index_b: Any, *parts: Any) -> Any:
    """(runs as a Ray task) the payload of `total` rows from the head part's `count`
    parts (rows index_a) and the rest's (rows index_b)."""
    import torch

    from graphrl.backends.stream_parts import put_rows

    def cat(ps: tuple[Any, ...]) -> Any:
        return {f: torch.cat([p[f] for p in ps]) for f in ps[0]} if ps else None
    a, b = cat(parts[:count]), cat(parts[count:])
    return put_rows(total, [(i, p) for i, p in ((index_a, a), (index_b, b)) if p is not None])


def run_rest(ex: Any, n: Node, env: dict[str, Any], iteration: int, make_value: Any) -> None:
    """A `head_part` call at the step after its batch's head: the rest of the rows (and
    the head part too, where no valid early result exists), put back in row order."""
    import ray
    import torch

    from graphrl.backends.stream_parts import cut_and_samples, head_mask, stream_source

    if n.target == "train":
        return run_train_rest(ex, n, env, iteration, make_value)
    key = ex.engines.node_engine[n.name]
    token = ex._weights(n, env, key)
    rollout = ex._resolve(env[n.inputs[1]], n.inputs[1])
    mask = head_mask(rollout, *cut_and_samples(stream_source(ex.graph)))
    index_a, index_b = torch.nonzero(mask)[:, 0], torch.nonzero(~mask)[:, 0]
    early = _state(ex)["done"].pop(n.name, None)
    part_a = None
    if early is not None and early[0] == iteration - 1 and early[1] == token.version:
        if not torch.equal(early[2], index_a):
            raise ExecutionError(f"node {n.name} ({n.call}): the generation ranks' head "
                                 f"part {early[2].tolist()} differs from the rollout's "
                                 f"{index_a.tolist()} (a streamed generation bug)")
        part_a = early[3]
    parts = []
    for index, ready in ((index_a, part_a), (index_b, None)):
        if not index.numel():
            parts.append(None)
            continue
        v = ready or _issue_forward(ex, n, {f: t[index] for f, t in rollout.items()},
                                    iteration, make_value)
        if v is None:   # an FSDP mesh wider than the part: the whole batch at once
            ex._run_call(n, env, iteration)
            return
        parts.append(v)
    a, b = parts
    refs = (a.parts if a else []) + (b.parts if b else [])
    task = ray.remote(num_cpus=0)(_combine)
    out = task.remote(int(mask.numel()), len(a.parts) if a else 0, index_a, index_b, *refs)
    env[n.outputs[0].name] = make_value(
        parts=[out], bounds=[(0, int(mask.numel()))],
        stamps=(a.stamps if a else []) + (b.stamps if b else []))
