"""verify_graph: the invariants every graph holds, before and after every pass.

Each failure raises GraphError naming the node and showing the graph text around it,
with the offending line marked `>>`.
"""
from __future__ import annotations

from collections import Counter

from .errors import GraphError
from .graph import CALL, NODE_KINDS, Graph, Node
from .graph_algos import ancestors, find_cycle
from .printer import graph_lines
from .types import WEIGHTS, PayloadSpec

CONTEXT_LINES = 3


def _context(g: Graph, node: Node | None, line: int | None = None) -> str:
    """The graph text around `node` (or around line `line` of graph_lines), marked `>>`."""
    lines = graph_lines(g)
    at = (1 + len(g.models) + len(g.inputs) + g.nodes.index(node)) if node is not None else line
    if at is None:
        return "\n".join("   " + ln for ln in lines)
    lo, hi = max(0, at - CONTEXT_LINES), min(len(lines), at + CONTEXT_LINES + 1)
    return "\n".join((">> " if i == at else "   ") + lines[i] for i in range(lo, hi))


def _fail(g: Graph, node: Node | None, message: str, line: int | None = None) -> GraphError:
    where = f"node {node.name} ({node.call}): " if node is not None else ""
    return GraphError(f"graph @{g.name}: {where}{message}", node.name if node else "",
                      _context(g, node, line))


def _tail_line(g: Graph) -> int:
    """Index in graph_lines of the `output` line (or of the first carry if none)."""
    return 1 + len(g.models) + len(g.inputs) + len(g.nodes)


def kind_of(spec: PayloadSpec) -> str:
    """The kind string an `expects` entry is matched against."""
    return f"{WEIGHTS}[{spec.model}]" if spec.is_weights else spec.kind


def verify_graph(g: Graph) -> Graph:
    """Check every invariant; return the graph unchanged so it chains."""
    _check_names(g)
    _check_lora(g)
    values = {v.name: v.spec for v in g.values()}
    producers = g.producers()
    for n in g.nodes:
        _check_node(g, n, values)
    cycle = find_cycle(g)
    if cycle:
        raise _fail(g, g.node(cycle[0]), "dependency cycle " + " -> ".join(cycle))
    seen = {v.name for v in g.inputs}
    for n in g.nodes:
        for i in n.inputs:
            if i not in seen:
                raise _fail(g, n, f"uses {i} before it is defined by {producers[i].name} "
                                  "(nodes must be listed in topological order)")
        seen.update(v.name for v in n.outputs)
    for o in g.outputs:
        if o not in values:
            raise _fail(g, None, f"output {o} is not defined", _tail_line(g))
    _check_carries(g, values)
    _check_weight_updates(g)
    return g


def _check_names(g: Graph) -> None:
    for label, names in (("model", [m.name for m in g.models]),
                         ("value", [v.name for v in g.values()])):
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            # Point at the redefinition: the last node producing the name, else the second
            # declaration line (models are lines 1.., graph inputs follow them).
            node = next((n for n in reversed(g.nodes)
                         if any(v.name == dup[0] for v in n.outputs)), None)
            line = None
            if node is None:
                second = [i for i, n in enumerate(names) if n == dup[0]][1]
                line = 1 + second + (len(g.models) if label == "value" else 0)
            raise _fail(g, node, f"duplicate {label} name {dup[0]}", line)


def _check_lora(g: Graph) -> None:
    """LoRA (graphrl.lora): targets that are linears of the model's family, on a
    trainable lm model; a shared-base model names a model with LoRA of the same
    architecture, and is frozen with an lm head."""
    from .errors import UsageError

    names = {m.name: m for m in g.models}
    for k, m in enumerate(g.models):
        why = ""
        if m.spec.lora is not None:
            try:
                m.spec.lora.check(m.spec, f"model {m.name}")
            except UsageError as e:
                why = str(e).partition(": ")[2]
            if not why and not (m.trainable and m.spec.head == "lm"):
                why = "LoRA adapts a trainable model with an lm head (a policy)"
        if m.shares_base:
            base = names.get(m.shares_base)
            from dataclasses import replace

            if base is None or base.spec.lora is None:
                why = (f"shares_base={m.shares_base!r} is not a model with LoRA adapters "
                       "(only a LoRA model's frozen base can be shared)")
            elif m.trainable or m.spec.head != "lm" or m.spec.lora is not None:
                why = "a shared-base model is frozen, has an lm head and no LoRA of its own"
            elif replace(base.spec, lora=None) != m.spec:
                why = (f"its architecture {m.spec.text()} is not {m.shares_base}'s base "
                       f"{replace(base.spec, lora=None).text()}")
        if why:
            raise _fail(g, None, f"model {m.name}: {why}", 1 + k)


def _check_node(g: Graph, n: Node, values: dict[str, PayloadSpec]) -> None:
    if not n.outputs:
        raise _fail(g, n, "a node needs at least one output")
    if n.kind not in NODE_KINDS:
        raise _fail(g, n, f"unknown node kind {n.kind!r} (known: {', '.join(NODE_KINDS)})")
    if n.model:
        names = [m.name for m in g.models]
        if n.model not in names:
            raise _fail(g, n, f"unknown model {n.model!r} (declared: {', '.join(names)})")
        model = g.model(n.model)
        if n.kind == CALL and n.target not in model.methods:
            raise _fail(g, n, f"model {n.model!r} has no method {n.target!r} "
                              f"(its methods: {', '.join(model.methods)})")
    elif n.kind == CALL:
        raise _fail(g, n, "a call needs a model")
    for i in n.inputs:
        if i not in values:
            raise _fail(g, n, f"undefined input {i}")
    if len(n.expects) != len(n.inputs):
        raise _fail(g, n, f"signature lists {len(n.expects)} inputs but the node has "
                          f"{len(n.inputs)}")
    batches = {}
    for i, want in zip(n.inputs, n.expects):
        got = values[i]
        if want != "*" and kind_of(got) != want:
            raise _fail(g, n, f"payload mismatch: input {i} is {kind_of(got)} "
                              f"({got.text()}) but {n.call} expects {want}")
        if not got.is_weights:
            batches[i] = got.batch
    if n.kind == CALL and len(set(batches.values())) > 1:
        shown = ", ".join(f"{i}: {b}" for i, b in batches.items())
        raise _fail(g, n, f"payload mismatch: inputs disagree on batch size ({shown})")


def _check_carries(g: Graph, values: dict[str, PayloadSpec]) -> None:
    inputs = {v.name for v in g.inputs}
    first = _tail_line(g) + (1 if g.outputs else 0)
    for k, (dst, src) in enumerate(g.carries):
        if dst not in inputs:
            raise _fail(g, None, f"carry target {dst} is not a graph input", first + k)
        if src not in values:
            raise _fail(g, None, f"carry source {src} is not defined", first + k)
        if kind_of(values[dst]) != kind_of(values[src]):
            raise _fail(g, None, f"carry {dst} <- {src}: {kind_of(values[src])} cannot feed "
                                 f"{kind_of(values[dst])}", first + k)


def _check_weight_updates(g: Graph) -> None:
    """A train updates weights in place: every other reader of the weights it consumes
    must run before it (be its ancestor), or it would read half-updated weights."""
    readers = g.consumers()
    for n in g.nodes:
        if n.target != "train":
            continue
        weights = [i for i, e in zip(n.inputs, n.expects) if e.startswith(WEIGHTS)]
        before = ancestors(g, n.name)
        for w in weights:
            for r in readers.get(w, []):
                if r is not n and r.name not in before:
                    raise _fail(g, n, f"train overwrites {w} while {r.name} ({r.call}) "
                                      "still reads it and is not ordered before the train")


def verify_plan(plan: "Plan") -> "Plan":
    """A plan's invariants: every send has its recv, dependencies exist, the
    happens-before graph is acyclic (no deadlock), and simulated memory never exceeds a
    GPU. Raises GraphError naming the instruction; returns the plan."""
    from collections import Counter as _Counter

    from .simulate import find_deadlock, happens_before, pair_key

    ids = {i.id for _, i in plan.instrs()}
    ends = _Counter()
    for w, i in plan.instrs():
        key = pair_key(w, i)
        if key:
            ends[(key, i.op)] += 1
        for d in i.deps:
            if d not in ids:
                raise GraphError(f"plan: {i.id} ({i.label or i.op}) waits on unknown "
                                 f"instruction {d}", i.id)
    for (key, op), count in sorted(ends.items()):
        other = "recv" if op == "send" else "send"
        if ends[(key, other)] != count:
            raise GraphError(f"plan: {op} {key} has no matching {other} "
                             f"({count} {op} vs {ends[(key, other)]} {other})", key)
    cycle = find_deadlock(happens_before(plan))
    if cycle:
        raise GraphError("plan: deadlock, these wait on each other: " + " -> ".join(cycle))
    from .memory_track import memory_uses

    capacity = plan.cluster.gpu.memory_bytes
    for use in memory_uses(plan):
        i = use.instr
        if i.op == "run" and i.mem and use.in_use > capacity:
            raise GraphError(f"plan: {i.id} ({i.label}) needs {use.in_use / 2**30:.1f} GiB on "
                             f"GPU {use.worker} ({i.mem / 2**30:.1f} GiB for the call + "
                             f"{use.others / 2**30:.1f} GiB of other resident models), the "
                             f"GPU has {capacity / 2**30:.1f} GiB", i.id)
    return plan
