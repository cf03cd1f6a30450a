"""Read a plan.json written by `graphrl compile --dump`: its fields are checked against the
plan format (graphrl-plan/1) before the plan is built, and errors name the file and field."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import GraphRLError, UsageError

# field -> (JSON type(s), what it is)
PLAN_FIELDS: dict[str, tuple[Any, str]] = {
    "format": (str, "the string graphrl-plan/1"),
    "graph": (str, "the graph's text form"),
    "cluster": (dict, "an object {nodes, gpus_per_node, gpu}"),
    "policy": (str, "a policy name"),
    "predicted_step_seconds": ((int, float), "a number of seconds"),
    "streams": (list, "a list of {worker, instrs}"),
    "resident": (list, "a list of [gpu, unit, bytes]"),
    "notes": (list, "a list of [name, text]"),
}
CLUSTER_FIELDS = {"nodes": int, "gpus_per_node": int, "gpu": str}


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number" if isinstance(v, (int, float))
                                    else type(v).__name__)


def check_plan_dict(d: Any) -> None:
    """ValueError naming the first field of `d` that breaks the plan format."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object (a graphrl plan), got {_type_name(d)}")
    if d.get("format") != "graphrl-plan/1":
        raise ValueError("not a graphrl plan (field format is not \"graphrl-plan/1\")")
    for key, (kind, what) in PLAN_FIELDS.items():
        if key not in d:
            raise ValueError(f"field {key} is missing ({what})")
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ValueError(f"field {key} must be {what}, got {_type_name(v)}")
    for key, kind in CLUSTER_FIELDS.items():
        v = d["cluster"].get(key)
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ValueError(f"field cluster.{key} must be {_type_name(kind())}, "
                             f"got {_type_name(v)}")
    for i, s in enumerate(d["streams"]):
        if not isinstance(s, dict) or not isinstance(s.get("worker"), int) or not isinstance(
                s.get("instrs"), list) or not all(isinstance(x, dict) for x in s["instrs"]):
            raise ValueError(f"field streams[{i}] must be an object {{worker: int, instrs: "
                             "[objects]}")
    for key in ("resident", "notes"):
        for i, r in enumerate(d[key]):
            if not isinstance(r, list):
                raise ValueError(f"field {key}[{i}] must be a list, got {_type_name(r)}")


def load_plan(path: str) -> Any:
    """The Plan in the JSON file at `path`; UsageError naming the file and what is wrong."""
    from .plan import Plan

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
    try:
        d = json.loads(text)
        check_plan_dict(d)
        return Plan.from_json(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not a graphrl plan: not valid JSON ({e})") from None
    except (ValueError, KeyError, TypeError, AttributeError, GraphRLError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a graphrl plan: {detail}") from None


__all__ = ["load_plan", "check_plan_dict"]
