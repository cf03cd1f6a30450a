"""What a Ray run reports beside the RL loop's summary: each reshard's bytes (measured,
the executor's TransferPlan, the compiled plan's figure) and predicted vs measured
seconds per call."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from graphrl.plan import Plan
from graphrl.timeline import Event


@dataclass(frozen=True)
class ReshardRecord:
    """One reshard of one step: bytes each GPU sent, three ways."""

    iteration: int
    node: str
    model: str
    measured: Mapping[int, int]        # bytes each rank sent (ReshardStats)
    transfer_plan: Mapping[int, int]   # the executor's TransferPlan, float32 on the wire
    compiled: Mapping[int, int]        # the compiled plan's reshard instructions (weights
                                       # in the model spec's dtype, e.g. bf16)
    scale: float                       # wire itemsize / the spec dtype's bytes
    exact: Optional[bool] = None       # generation weights == training weights (check)
    sync: str = "weights"              # what moved: weights, or adapters (LoRA)
    received: Mapping[int, int] = field(default_factory=dict)   # bytes each rank received


def predicted_call_seconds(plan: Plan) -> dict[str, float]:
    """Call -> predicted seconds per step: the spans of its runs (and reshards) in
    `graphrl.simulate.simulate(plan)`'s timeline, named as the measured events are."""
    import dataclasses

    from graphrl.simulate import simulate
    from graphrl.timeline import call_seconds

    events, _ = simulate(plan)
    names = {n.name: n for n in plan.graph.nodes}
    kept = [dataclasses.replace(e, call=names[e.node].call) for e in events
            if e.node in names and (e.call == names[e.node].call
                                    or e.call.startswith("reshard "))]
    return call_seconds(kept)


def summary_lines(plan: Plan, reshards: Sequence[ReshardRecord], events: Sequence[Event],
                  steps: int) -> list[str]:
    """Predicted vs measured seconds per call (per step), and each reshard's bytes."""
    from graphrl.timeline import call_seconds

    predicted = predicted_call_seconds(plan)
    measured = {c: s / max(steps, 1) for c, s in call_seconds(events).items()}
    lines = [f"  predicted vs measured seconds per call, per step (plan: "
             f"{plan.cluster.text()}, predicted step "
             f"{plan.predicted_step_seconds:.3f} s):",
             f"    {'call':<24} {'predicted':>10} {'measured':>10}"]
    for call in sorted(set(predicted) | set(measured),
                       key=lambda c: -measured.get(c, predicted.get(c, 0.0))):
        p = f"{predicted[call]:10.4f}" if call in predicted else f"{'-':>10}"
        m = f"{measured[call]:10.4f}" if call in measured else f"{'-':>10}"
        lines.append(f"    {call:<24} {p} {m}")
    last: dict[str, ReshardRecord] = {}
    for r in reshards:
        last[r.node] = r
    for r in last.values():
        ok = r.measured == r.transfer_plan
        same = r.measured == {g: int(b * r.scale) for g, b in r.compiled.items()}
        compiled = (f"{'=' if same else '!='} the compiled plan" if r.scale == 1 else
                    f"compiled plan {dict(sorted(r.compiled.items()))} in the spec dtype, "
                    f"x{r.scale:g} for the float32 weights run here")
        what = " (LoRA adapters only)" if r.sync == "adapters" else ""
        lines.append(f"  reshard[{r.model}]{what} bytes sent per GPU: measured "
                     f"{dict(sorted(r.measured.items()))} "
                     f"({'=' if ok else '!='} the transfer plan; {compiled})")
        got = {g: b for g, b in sorted(r.received.items()) if b}
        if got:
            lines.append(f"    received per GPU, per step: {got}")
    return lines


def call_engines(graph: Any, resolved: Mapping[str, str],
                 ran: Mapping[str, tuple[int, set[str]]]) -> dict[str, dict[str, Any]]:
    """Call -> {"planned": its strategy text, "planned_engine", "mesh", the engine and
    degrees its ranks reported running it with at its last run (graphrl.engines
    DEGREES), and "differs": each degree that differs from the plan, or that differs
    between its ranks}. `resolved`: node -> engine (graphrl.engines.resolve_engines);
    `ran`: node -> (iteration, the ranks' degrees_text)."""
    from graphrl.engines import degree_mismatches, parse_degrees, planned_degrees

    out = {}
    for n in graph.nodes:
        if n.name not in resolved or n.name not in ran:
            continue
        texts = sorted(ran[n.name][1])
        got = parse_degrees(texts[0])
        differs = [] if got.get("engine") == "noop" else degree_mismatches(
            n.target, planned_degrees(resolved[n.name], n.target, n.placement.strategy,
                                      precision=graph.model(n.model).spec.dtype), got)
        if len(texts) > 1:
            differs.append(f"ranks ran {' | '.join(texts)}")
        out[n.call] = {"planned": n.placement.strategy.text(),
                       "planned_engine": resolved[n.name],
                       "mesh": n.placement.mesh.text(), **got, "differs": differs}
    return out


def engine_lines(engines: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per call: the planned engine and strategy, what ran, and whether they agree."""
    lines = ["  engine and degrees per call (planned | what ran | agree):",
             f"    {'call':<20} {'mesh':<6} {'planned':<44} {'ran':<62} agree"]
    for call, e in engines.items():
        ran = " ".join(f"{k}={e[k]}" for k in ("engine", "dp", "tp", "pp", "sp", "zero",
                                                "micro_batches", "offload", "precision", "as")
                       if k in e)
        planned = f"{e['planned_engine']} {e['planned']}"
        agree = "yes" if not e["differs"] else "NO: " + ", ".join(e["differs"])
        lines.append(f"    {call:<20} {e['mesh']:<6} {planned:<44} {ran:<62} {agree}")
    return lines


__all__ = ["ReshardRecord", "predicted_call_seconds", "summary_lines", "engine_lines",
           "call_engines"]
