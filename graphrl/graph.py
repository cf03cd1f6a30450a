"""The graph IR: models, nodes and values of one traced RL step.

A Graph is pure data (frozen dataclasses): it prints, parses, hashes and compares equal.
Nodes are listed in topological order. Every value has one producer: a graph input, or
one output of one node. Model weights are values too: `%policy@0` is the policy's
weights at the start of the step, `train[policy]` produces `%policy@1`, and the graph's
carry `%policy@0 <- %policy@1` is the cross-iteration edge that feeds the next step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

from .parallel import DeviceMesh, Strategy
from .schedule import Schedule, Timing
from .types import ModelSpec, PayloadSpec

# Node kinds: a call on a model, a pure op on tensors, or a system op inserted by passes.
CALL, OP, SYSTEM = "call", "op", "system"
NODE_KINDS = (CALL, OP, SYSTEM)

# Methods a model offers, by head: an LM generates and scores tokens; a critic gives
# values; a reward model gives a score. Trainable models also train.
HEAD_METHODS = {"lm": ("generate", "forward"), "value": ("forward",), "score": ("forward",)}

AttrValue = Any  # int | float | str | bool


@dataclass(frozen=True)
class ModelDecl:
    """A model of the step: its architecture, role and engine. `shares_base`: the model
    (with LoRA adapters) whose frozen base this one is: it holds no weights of its own
    and runs on that model's weights with the adapters switched off (graphrl.lora)."""

    name: str
    spec: ModelSpec
    role: str
    trainable: bool
    engine: str = "hf"
    shares_base: str = ""

    @property
    def methods(self) -> tuple[str, ...]:
        return HEAD_METHODS[self.spec.head] + (("train",) if self.trainable else ())


@dataclass(frozen=True)
class Value:
    """A named value: `%name` and its payload type."""

    name: str
    spec: PayloadSpec


@dataclass(frozen=True)
class Placement:
    """Where and how a node runs (set by the assign-devices pass)."""

    mesh: DeviceMesh
    strategy: Strategy

    def text(self) -> str:
        return f"@[{self.mesh.text()}]{{{self.strategy.text()}}}"


@dataclass(frozen=True)
class Node:
    """One operation. `target` is the method (call), op name (op) or system op.

    `expects` lists the payload kind each input must have (`Weights[policy]`, `Rollout`,
    or `*` for any), the node's signature; verify checks producers against it.
    """

    kind: str
    target: str
    inputs: tuple[str, ...]
    expects: tuple[str, ...]
    outputs: tuple[Value, ...]
    model: str = ""
    attrs: tuple[tuple[str, AttrValue], ...] = ()
    placement: Placement | None = None
    group: str = ""  # nodes sharing a non-empty group may run in parallel
    timing: Timing | None = None   # its place in the predicted schedule (assign-devices)

    @property
    def name(self) -> str:
        """A node is named after its first output (as in torch.fx): `%rollout`."""
        return self.outputs[0].name if self.outputs else "<no outputs>"

    def attr(self, key: str, default: AttrValue = None) -> AttrValue:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def attr_dict(self) -> dict[str, AttrValue]:
        return dict(self.attrs)

    @property
    def call(self) -> str:
        """`policy.generate` for calls, `gae` for ops, `reshard[policy]` for system ops."""
        if self.kind == CALL:
            return f"{self.model}.{self.target}"
        return f"{self.target}[{self.model}]" if self.model else self.target


@dataclass(frozen=True)
class Graph:
    name: str
    models: tuple[ModelDecl, ...]
    inputs: tuple[Value, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    carries: tuple[tuple[str, str], ...] = ()  # (input value, value feeding it next step)
    schedule: Schedule | None = None   # what it was placed for (assign-devices), see schedule.py

    # -- lookups ----------------------------------------------------------------------
    def model(self, name: str) -> ModelDecl:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def weights_owner(self, name: str) -> str:
        """The model whose weights `name`'s calls run on: the model itself, or for a
        shared base (ModelDecl.shares_base) the model whose base it is."""
        return next((m.shares_base or m.name for m in self.models if m.name == name), name)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(name)

    def producers(self) -> dict[str, Node]:
        """Value name -> the node producing it (graph inputs are absent)."""
        return {v.name: n for n in self.nodes for v in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                users.setdefault(i, []).append(n)
        return users

    def calls(self) -> Iterator[Node]:
        return (n for n in self.nodes if n.kind == CALL)

    def last_uses(self) -> dict[str, list[str]]:
        """Node name -> values dead after it runs (never outputs or carried values)."""
        keep = set(self.outputs) | {src for _, src in self.carries}
        last: dict[str, str] = {}
        for n in self.nodes:
            for i in n.inputs:
                last[i] = n.name
        dead: dict[str, list[str]] = {}
        for value, node in last.items():
            if value not in keep:
                dead.setdefault(node, []).append(value)
        return dead

    # -- functional updates -----------------------------------------------------------
    def replace_node(self, name: str, new: Node) -> "Graph":
        return replace(self, nodes=tuple(new if n.name == name else n for n in self.nodes))

    def with_nodes(self, nodes: Iterable[Node]) -> "Graph":
        return replace(self, nodes=tuple(nodes))

    def insert_before(self, name: str, new: Node) -> "Graph":
        out: list[Node] = []
        for n in self.nodes:
            if n.name == name:
                out.append(new)
            out.append(n)
        return replace(self, nodes=tuple(out))

    def rename_input(self, node: str, old: str, new: str) -> "Graph":
        n = self.node(node)
        return self.replace_node(node, replace(n, inputs=tuple(new if i == old else i
                                                               for i in n.inputs)))

    def text(self) -> str:
        from .printer import print_graph

        return print_graph(self)

    def __str__(self) -> str:
        return self.text()
