"""Canonical text form of a Graph; `parser.parse_graph` reads it back.

    graph @ppo_step {
      model policy = llama{vocab=32, hidden=64, ...} role=policy trainable engine=hf
      input %prompts : Prompts[32, seq=8]{tokens:i64[s]}
      input %policy@0 : Weights[policy, bytes=123456]
      %rollout = call generate[policy](%policy@0, %prompts) {max_new_tokens=12} : (Weights[policy], Prompts) -> Rollout[32, seq=20]{tokens:i64[s], ...}
      %advantages, %returns = op gae(%rollout, %scores) {lam=0.95} : (Rollout, Scores) -> Advantages[...]{...}, Returns[...]{...}
      output %score
      carry %policy@0 <- %policy@1
    }

One line per model, input, node, output list and carry; nodes in topological order;
attributes sorted by key. A node may end in a placement `@[0-3]{dp=2,tp=2,pp=1}` and a
parallel group `par=g0`. Names are the user's or the tracer's, never object ids.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .types import PayloadSpec

if TYPE_CHECKING:   # annotations only: Graph.text() calls this printer
    from .graph import Graph, ModelDecl, Node


def format_attr(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"attribute values are int, float, bool or str, not {type(value).__name__}")


def format_attrs(attrs: tuple[tuple[str, object], ...]) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in sorted(attrs)) + "}"


def model_line(m: ModelDecl) -> str:
    mode = "trainable" if m.trainable else "frozen"
    base = f" base={m.shares_base}" if m.shares_base else ""
    return f"model {m.name} = {m.spec.text()} role={m.role} {mode} engine={m.engine}{base}"


def payload_text(spec: PayloadSpec) -> str:
    return spec.text()


def node_line(n: Node) -> str:
    outs = ", ".join(v.name for v in n.outputs)
    target = f"{n.target}[{n.model}]" if n.model else n.target
    args = ", ".join(n.inputs)
    sig = f"({', '.join(n.expects)}) -> " + ", ".join(v.spec.text() for v in n.outputs)
    line = f"{outs} = {n.kind} {target}({args}){format_attrs(n.attrs)} : {sig}"
    if n.placement is not None:
        line += f" {n.placement.text()}"
    if n.group:
        line += f" par={n.group}"
    if n.timing is not None:
        line += " at" + format_attrs(n.timing.attrs()).lstrip()
    return line


def graph_lines(g: Graph) -> list[str]:
    """The text form as a list of lines (verify uses it to show context)."""
    lines = [f"graph @{g.name} {{"]
    lines += [f"  {model_line(m)}" for m in g.models]
    if g.schedule is not None:
        lines.append("  schedule" + format_attrs(g.schedule.attrs()))
    lines += [f"  input {v.name} : {v.spec.text()}" for v in g.inputs]
    lines += [f"  {node_line(n)}" for n in g.nodes]
    if g.outputs:
        lines.append(f"  output {', '.join(g.outputs)}")
    lines += [f"  carry {dst} <- {src}" for dst, src in g.carries]
    lines.append("}")
    return lines


def print_graph(g: Graph) -> str:
    return "\n".join(graph_lines(g)) + "\n"
