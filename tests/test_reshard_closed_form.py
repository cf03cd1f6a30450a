"""The closed-form reshard price (graphrl.cost.reshard_received_bytes), used by the search
and by insert-reshard above its exact-planning size, against the exact transfer planner
on the same colocated layouts: within a few percent, nested (HybridFlow §5.4 grouping
applies) or not (generation split finer than training, ZeRO-3 flat slices)."""
from __future__ import annotations

import pytest

from graphrl.cost import reshard_received_bytes
from graphrl.graph import Placement
from graphrl.parallel import DeviceMesh, Strategy
from graphrl.passes.insert_reshard import analytic_traffic, generation_placement, plan_traffic
from graphrl.types import ModelSpec

SPEC = ModelSpec("llama", 1024, 256, 8, 8, 8, 512, 512, "lm")
MESH = DeviceMesh.range(0, 8)
CASES = [
    (Strategy(dp=2, tp=4), Strategy(dp=4, tp=2)),          # nested: HybridFlow grouping
    (Strategy(dp=1, tp=4, pp=2), Strategy(dp=4, tp=2)),    # nested across stages
    (Strategy(dp=2, tp=2, pp=2), Strategy(dp=2, tp=4)),    # generation finer than training
    (Strategy(dp=1, tp=2, pp=4), Strategy(dp=1, tp=8)),    # the 13B-on-128 case in small
    (Strategy(dp=4, tp=2), Strategy(dp=1, tp=8)),
    (Strategy(dp=8, zero=3), Strategy(dp=4, tp=2)),        # ZeRO-3 flat slices
]


@pytest.mark.parametrize("train,gen", CASES)
def test_closed_form_matches_the_exact_plan(train, gen):
    src = Placement(MESH, train)
    dst = generation_placement(src, Placement(MESH, gen))
    exact = max(b for _, b in plan_traffic(SPEC, src, dst, exact=True).received)
    closed = max(b for _, b in analytic_traffic(SPEC, src, dst).received)
    assert closed == int(reshard_received_bytes(SPEC.weight_bytes, train, gen, colocated=True))
    assert closed == pytest.approx(exact, rel=0.05)


def test_non_nested_layouts_are_not_free():
    """Training tp=2 x pp=4 and generation tp=8 hold shards of the same size but of
    different slices: the old closed form (shard minus held, floored at 0) called it
    free; the GPU receives its whole generation shard."""
    m = SPEC.weight_bytes
    assert reshard_received_bytes(m, Strategy(tp=2, pp=4), Strategy(tp=8), True) == m / 8
    # nested: HybridFlow's (d_g - 1) / (t p) M with t=8, p=1, t_g=2 (d_g = 4)
    assert reshard_received_bytes(m, Strategy(dp=2, tp=8), Strategy(dp=8, tp=2), True) == \
        pytest.approx(3 / 8 * m)
    assert reshard_received_bytes(m, Strategy(tp=8), Strategy(tp=2), False) == m / 2
