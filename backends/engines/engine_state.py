"""An engine's state in a placement-independent form, for checkpoints: full weights by
parameter name, optimizer state by parameter name (not by position in one optimizer's
parameter list), and the version. Any engine that holds full tensors, or can gather
them, writes it; any engine loads it onto its own layout (graphrl.checkpoint)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from graphrl.errors import UsageError


def named_optimizer_state(module: Any, optimizer: Any,
                          full: Callable[[Any], Any] = lambda t: t) -> dict[str, Any] | None:
    """torch optimizer state keyed by parameter name; `full` turns a sharded tensor
    (an FSDP2 DTensor) into the full one. None before the first train step."""
    if optimizer is None:
        return None
    sd = optimizer.state_dict()
    names = [n for n, _ in module.named_parameters()]
    groups, state = [], {}
    for g in sd["param_groups"]:
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [names[i] for i in g["params"]]})
    for i, s in sd["state"].items():
        state[names[i]] = {k: full(v) for k, v in s.items()}
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(module: Any, optimizer: Any, named: Mapping[str, Any],
                               local: Callable[[str, Any], Any] = lambda n, t: t) -> None:
    """Load what named_optimizer_state wrote; `local(name, full)` cuts this rank's part
    of a full tensor (FSDP2)."""
    names = [n for n, _ in module.named_parameters()]
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(named["state"]) - set(index))
    if unknown:
        raise UsageError(f"optimizer state names parameters this model lacks: {unknown[:3]}")
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    state = {index[n]: {k: (local(n, v) if k != "step" and getattr(v, "dim", lambda: 0)()
                            else v) for k, v in s.items()}
             for n, s in named["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})
