"""The Ray executor's part of streamed generation (backends/stream_generation.py).

A generate node marked `stream_cut` becomes three calls on each rank of its mesh, each
on the rank's own rows of the batch: `stream_head` where the plan runs the node (it
overlaps the training pool's calls), and, once the step's other instructions are issued
— so after the train and the weight push (reshard) that the rank's actor runs first, in
issue order — `stream_tail` (which may start the next step's prompts, `upcoming`) and
`stream_logprobs` (the behaviour log-probs the tail assembled). Every rank streams its
rows with the sampling noise of the whole batch, so the tokens equal the local
backend's. Driver-side functions take the RayExecutor (`ex`); `run_stream` runs on the
rank.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from graphrl.errors import UsageError
from graphrl.graph import Node

from .specs import CallSpec, InputSpec

STREAM_KINDS = ("replicas", "noop")   # engines whose module is whole on every rank


def check_streams(ex: Any) -> None:
    """Streamed generate nodes need a generation engine that holds the whole model on
    each rank (UsageError naming the node otherwise)."""
    from graphrl.backends.stream_generation import stream_nodes

    for n in stream_nodes(ex.graph):
        spec = ex.engines.specs[ex.engines.node_engine[n.name]]
        if spec.kind not in STREAM_KINDS:
            raise UsageError(f"node {n.name} ({n.call}) streams its generation "
                             f"(--staleness), which needs a replicated generation engine; "
                             f"its engine {spec.key} is {spec.kind} on GPUs {spec.gpus}: "
                             "place generation on GPUs of its own")


def _heads(ex: Any) -> dict[str, int]:
    """Node -> weights version of the step's streamed heads issued, not yet tailed."""
    return ex.__dict__.setdefault("_stream_heads", {})


def _ranks(ex: Any, n: Node) -> list[tuple[int, tuple[int, int]]]:
    from .assign import split_rows

    batch = ex.graph.value(n.inputs[1]).spec.batch
    ranks = n.placement.mesh.gpus
    out = [(rank, split_rows(batch, len(ranks), i)) for i, rank in enumerate(ranks)]
    return [(r, b) for r, b in out if b[1] > b[0]]


def _common(ex: Any, n: Node, iteration: int, method: str, output: Any,
            **extra: Any) -> dict[str, Any]:
    from graphrl.backends.engines.hf import seed_for

    attrs = tuple(sorted({**n.attr_dict, **extra}.items()))
    return dict(node=n.name, call=n.call, model=n.model, method=method,
                engine=ex.engines.node_engine[n.name], attrs=attrs,
                seed=seed_for(ex.seed, iteration, n.name), iteration=iteration,
                output=output, total=ex.graph.value(n.inputs[1]).spec.batch)


def stream_head(ex: Any, n: Node, env: Mapping[str, Any], iteration: int) -> None:
    """Issue the head of streamed generate node `n` on each rank of its mesh."""
    key = ex.engines.node_engine[n.name]
    token = ex._weights(n, env, key)
    v = env[n.inputs[1]]
    ex._to_refs(v)
    common = _common(ex, n, iteration, "stream_head", n.outputs[0].spec,
                     stream_version=token.version)
    _heads(ex)[n.name] = token.version
    for rank, (lo, hi) in _ranks(ex, n):
        picked = [k for k, (a, b) in enumerate(v.bounds) if a < hi and b > lo] or [0]
        cs = CallSpec(inputs=(InputSpec(len(picked), v.bounds[picked[0]][0]),),
                      rows=(lo, hi), **common)
        ex._submit(rank, "run", n, cs, *[v.parts[k] for k in picked])
    from .head_parts import early_calls

    early_calls(ex, n, _ranks(ex, n), common)


def _pushed(ex: Any) -> dict[str, int]:
    """Generation engine -> the weights version a tail's push gave it."""
    return ex.__dict__.setdefault("_stream_pushed", {})


def _push_node(ex: Any, n: Node) -> Optional[Node]:
    """The reshard node feeding generate node n's weights, if any."""
    producers = ex.graph.producers()
    p = producers.get(n.inputs[0])
    return p if p is not None and p.target == "reshard" else None


LATER_PARTS = ("tail", "early")   # plan parts issued after the step's other instructions


def push_before_head(ex: Any, n: Node, env: dict[str, Any], iteration: int,
                     make_value: Any, checks: list[Any]) -> list[tuple[Node, Any]]:
    """Bind the weights of streamed generate node `n`, whose push the plan places after
    the head (passes/lower_stream.py: it pushes the weights the step's train makes, which
    stream_tails does): already there when the previous step's tail pushed them, else
    (the first step) pushed now, before the head. Returns the push run, if any, for the
    step's reshard records; `checks` gains its check where reshards are checked."""
    push = _push_node(ex, n)
    if push is None or skip_push(ex, push, env, make_value):
        return []
    stats = ex._run_reshard(push, env, iteration)
    _pushed(ex)[ex.engines.gen_engine[push.model]] = env[push.inputs[0]].token.version
    if ex.check_reshards and not ex.noop:
        checks.append(ex._check_reshard(push))
    return [(push, stats)]


def skip_push(ex: Any, n: Node, env: dict[str, Any], make_value: Any) -> bool:
    """A step's reshard into a streaming generation engine that the previous step's
    tail already pushed at this version: nothing to send (binds its output)."""
    token = env[n.inputs[0]].token
    dst = ex.engines.gen_engine.get(n.model)
    if token is None or _pushed(ex).get(dst) != token.version \
            or ex.versions.get(dst) != token.version:
        return False
    env[n.outputs[0].name] = make_value(token=token)
    return True


def stream_tails(ex: Any, env: dict[str, Any], iteration: int,
                 upcoming: Optional[Mapping[str, Any]], make_value: Any
                 ) -> list[tuple[Node, Any]]:
    """Issue the tails of the step's streamed generate nodes (after every other
    instruction of the step) and bind their three outputs in `env`. Before each tail,
    the weights the step's train made are pushed to the generation engine (the plan's
    reshard node, run now instead of at the next step's start); returns the pushes
    (reshard node, per-rank stats refs) for the step's reshard records."""
    import ray
    import torch

    from graphrl.backends.engines.hf import seed_for
    from graphrl.backends.local import WeightsToken

    heads = _heads(ex)
    pushes = []
    for name in sorted(heads):
        n = ex.graph.node(name)
        version = heads.pop(name)
        push = _push_node(ex, n)
        dst = ex.engines.node_engine[n.name]
        if push is not None and ex.versions[push.model] != ex.versions[dst]:
            new = WeightsToken(push.model, ex.versions[push.model])
            pushes.append((push, ex._run_reshard(push, {push.inputs[0]: make_value(
                token=new)}, iteration)))
            _pushed(ex)[dst] = new.version
        key = ex.engines.node_engine[n.name]
        nxt = None
        name = n.inputs[1].lstrip("%")
        if upcoming is not None and name in upcoming:
            nxt = ray.put(upcoming[name])
        extra = {"stream_version": ex.versions[key]}
        if nxt is not None:
            extra["stream_next_seed"] = seed_for(ex.seed, iteration + 1, n.name)
        common = _common(ex, n, iteration, "stream_tail", n.outputs[0].spec, **extra)
        samples = int(n.attr("samples", 1))
        results, stamps, bounds, lp, lp_stamps = [], [], [], [], []
        for rank, (lo, hi) in _ranks(ex, n):
            cs = CallSpec(inputs=(InputSpec(1, 0),) if nxt is not None else (),
                          rows=(lo, hi), **common)
            r, s = ex._submit(rank, "run", n, cs, *([nxt] if nxt is not None else []))
            results.append(r)
            stamps.append(s)
            bounds.append((lo * samples, hi * samples))
            cs = CallSpec(inputs=(), rows=(lo, hi), **dict(
                common, method="stream_logprobs", output=n.outputs[1].spec))
            r, s = ex._submit(rank, "run", n, cs)
            lp.append(r)
            lp_stamps.append(s)
        total = ex.graph.value(n.outputs[0].name).spec.batch
        env[n.outputs[0].name] = make_value(parts=results, bounds=bounds, stamps=stamps)
        env[n.outputs[1].name] = make_value(parts=lp, bounds=list(bounds), stamps=lp_stamps)
        env[n.outputs[2].name] = make_value(local={"version": torch.full(
            (total,), version, dtype=torch.int64)})
    return pushes


def run_stream(worker: Any, engine: Any, spec: CallSpec,
               data: list[tuple[Mapping[str, Any], int]]) -> Any:
    """On a rank: this rank's rows of a stream_head / stream_tail / stream_logprobs."""
    from graphrl.backends.stream_generation import stream_for
    from graphrl.backends.stream_parts import take_rows

    attrs = dict(spec.attrs)
    version = int(attrs.pop("stream_version"))
    next_seed = attrs.pop("stream_next_seed", None)
    engine = getattr(engine, "engine", engine)   # a ReplicatedEngine's HF/fast engine
    stream = stream_for(worker, spec.engine, spec.node, engine, attrs)
    lo, hi = spec.rows or (0, spec.total)
    samples = int(attrs.get("samples", 1))
    noise = (lo * samples, spec.total * samples)
    if spec.method == "stream_head":
        (prompts, first), = data
        mine = take_rows(prompts, slice(lo - first, hi - first))
        stream.head(spec.iteration, mine, spec.seed, version, noise)
        return None
    if spec.method == "stream_tail":
        nxt = None
        if next_seed is not None:
            (prompts, first), = data
            nxt = (spec.iteration + 1, take_rows(prompts, slice(lo - first, hi - first)),
                   int(next_seed), noise)
        rollout, behaviour, _ = stream.tail(spec.iteration, version, nxt)
        stream.finished[spec.iteration] = behaviour
        return rollout
    if spec.method == "stream_early":   # head_parts.py
        return stream.head_part(spec.iteration, lo * samples)
    if spec.method == "stream_logprobs":
        return stream.finished.pop(spec.iteration)
    raise UsageError(f"node {spec.node}: unknown stream method {spec.method!r}")
