"""Non-finite training stops the run: every iteration's metrics row (the reward, each
train call's loss, KL and other statistics, each float output's mean) is checked, and the
first NaN or infinite value stops the run with one line naming the iteration, the
quantity and the node that produced it — before the row reaches the metrics file or a
checkpoint. A NaN or infinity inside any output tensor reaches its mean, so one check of
the row covers every element at the cost of the reductions the row already made. The
executors also check each op's outputs (advantages, returns, scores) as they are made,
so a non-finite advantage is named before a train call consumes it."""
from __future__ import annotations

import math
from typing import Any, Mapping

from .errors import ExecutionError
from .graph import Graph


def first_nonfinite(row: Mapping[str, Any]) -> tuple[str, float] | None:
    """The first (key, value) of `row` that is a non-finite number, else None."""
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            return key, value
    return None


def check_finite(row: Mapping[str, Any], iteration: int, graph: Graph, reward: str) -> None:
    """Raise ExecutionError naming the iteration, the quantity and its producing node when
    a value of `row` (graphrl.runner.metrics_row) is NaN or infinite."""
    bad = first_nonfinite(row)
    if bad is None:
        return
    key, value = bad
    output = reward if key == "reward_mean" else key.split("/")[0]
    producers = graph.producers()
    node = producers.get(f"%{output}") or producers.get(output)
    where = f" (from {node.call}, node {node.name})" if node is not None else ""
    what = "the reward's mean" if key == "reward_mean" else key
    raise ExecutionError(f"iteration {iteration}: {what} is {value}{where}; the run stops "
                         "before this iteration's metrics and checkpoint are written "
                         "(non-finite training: check the reward's scale, the learning "
                         "rate and the model's weights)")


def check_op_outputs(node: Any, results: Any, iteration: int) -> None:
    """ExecutionError when an op (advantages, returns, scores: computed on the host)
    produced a NaN or infinite value: named before any train call consumes it."""
    import torch

    for value, payload in zip(node.outputs, results):
        for field, t in payload.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                bad = int((~torch.isfinite(t)).sum())
                name = value.name.lstrip("%")
                if bad:
                    raise ExecutionError(
                        f"iteration {iteration}: {node.call} produced {bad} non-finite "
                        f"value{'s' * (bad > 1)} (NaN or inf) in "
                        f"{name if field == name else f'{name}.{field}'} (node {node.name}); "
                        "the run stops before a train call consumes them (check the "
                        "reward's scale)")
