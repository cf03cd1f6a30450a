"""Shard algebra and reshard transfer plans: exactness, coverage, bytes, reference cases.

Reference figures: HybridFlow (Sheng et al., EuroSys'25) §5.3–5.4, quoted in DESIGN.md.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphrl.parallel import DeviceMesh, Strategy
from graphrl.reshard_plan import (apply_plan, assemble, bucketize, extract,
                                         hybridflow_traffic, naive_allgather_bytes,
                                         naive_allgather_bytes_by_gpu, plan_model_reshard,
                                         plan_transfer, verify_transfer_plan,
                                         zero_redundancy_mesh)
from graphrl.shard import (Box, FlatRange, TensorLayout, flat_intervals, flat_to_boxes,
                           layout_for, llama_params, model_layout, piece_region,
                           region_intersect, region_size, region_subtract, split_region)

FAST = settings(max_examples=120, deadline=None)
SOME = settings(max_examples=40, deadline=None)


# -- helpers ---------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@st.composite
def strategies_of(draw, world: int) -> Strategy:
    tp = draw(st.sampled_from(divisors(world)))
    pp = draw(st.sampled_from(divisors(world // tp)))
    zero = draw(st.sampled_from([0, 3]))
    return Strategy(dp=world // (tp * pp), tp=tp, pp=pp, zero=zero)


@st.composite
def reshard_cases(draw):
    """(src layout, dst layout) of one tensor: random shape, strategies and placement."""
    ndim = draw(st.integers(1, 3))
    world_s = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    placement = draw(st.sampled_from(["colocated", "disjoint", "overlap"]))
    world_d = world_s if placement == "colocated" else draw(st.sampled_from([1, 2, 4, 6, 8]))
    s_src, s_dst = draw(strategies_of(world_s)), draw(strategies_of(world_d))
    if draw(st.booleans()):   # shapes that every degree divides
        unit = math.lcm(s_src.tp * s_src.dp, s_dst.tp * s_dst.dp)
        shape = tuple(unit * draw(st.integers(1, 2)) if d < 2 else draw(st.integers(1, 4))
                      for d in range(ndim))
    else:
        shape = tuple(draw(st.integers(1, 9)) for _ in range(ndim))
    kinds = ["colwise", "replicate"] + (["rowwise"] if ndim >= 2 else [])
    kind_s, kind_d = draw(st.sampled_from(kinds)), draw(st.sampled_from(kinds))
    num_layers = draw(st.integers(1, 4))
    layer = draw(st.one_of(st.none(), st.integers(-1, num_layers)))
    src_gpus = draw(st.permutations(range(world_s)))
    start = {"colocated": 0, "disjoint": world_s,
             "overlap": draw(st.integers(0, max(0, world_s - 1)))}[placement]
    dst_gpus = draw(st.permutations(range(start, start + world_d)))
    src = layout_for("w", shape, DeviceMesh(tuple(src_gpus)), s_src, kind_s, layer_index=layer,
                     num_layers=num_layers, zero_format=draw(st.sampled_from(["flat", "dim0"])))
    dst = layout_for("w", shape, DeviceMesh(tuple(dst_gpus)), s_dst, kind_d, layer_index=layer,
                     num_layers=num_layers, zero_format=draw(st.sampled_from(["flat", "dim0"])))
    return src, dst


def shards_of(x: np.ndarray, layout: TensorLayout) -> dict[int, list[np.ndarray]]:
    return {g: extract(x, layout, g) for g in layout.gpus}


def assert_exact(plan, x: np.ndarray) -> None:
    out = apply_plan(plan, shards_of(x, plan.src))
    assert sorted(out) == list(plan.dst.gpus)
    for g in plan.dst.gpus:
        want = extract(x, plan.dst, g)
        assert len(out[g]) == len(want)
        for a, b in zip(out[g], want):
            assert a.shape == b.shape and np.array_equal(a, b)


def region_held_twice(layout: TensorLayout, g: int, other: TensorLayout) -> int:
    return region_size(region_intersect(layout.held(g), other.held(g)))


# -- the algebra ---------------------------------------------------------------------------
@FAST
@given(st.lists(st.integers(1, 5), min_size=0, max_size=4), st.data())
def test_flat_to_boxes_matches_row_major(extents, data):
    n = math.prod(extents)
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(a, n))
    boxes = flat_to_boxes(extents, a, b)
    assert len(boxes) <= max(1, 2 * len(extents) - 1)
    idx = np.arange(n).reshape(extents)
    got = np.concatenate([idx[bx.slices()].reshape(-1) for bx in boxes]) if boxes else []
    assert list(got) == list(range(a, b))     # disjoint, complete, in order
    assert flat_intervals(boxes, extents) == (((a, b),) if b > a else ())


@FAST
@given(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.data())
def test_box_subtract_intersect_and_intervals(shape, data):
    def box():
        b = []
        for n in shape:
            lo = data.draw(st.integers(0, n - 1))
            b.append((lo, data.draw(st.integers(lo + 1, n))))
        return Box(tuple(b))

    x, y = box(), box()
    mx, my = np.zeros(shape, bool), np.zeros(shape, bool)
    mx[x.slices()], my[y.slices()] = True, True
    inter = x.intersect(y)
    assert (inter.size if inter else 0) == int((mx & my).sum())
    diff = x.subtract(y)
    cover = np.zeros(shape, int)
    for b in diff:
        cover[b.slices()] += 1
    assert np.array_equal(cover, (mx & ~my).astype(int))
    flat = np.zeros(math.prod(shape), bool)
    for s, e in flat_intervals((x,), shape):
        flat[s:e] = True
    assert np.array_equal(flat, mx.reshape(-1))
    # a dim-0 chunk is one interval however large the rows
    assert len(flat_intervals((Box(((0, 1),) + tuple((0, n) for n in shape[1:])),), shape)) == 1


@FAST
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.data())
def test_split_region_keeps_canonical_order(shape, data):
    full = Box.full(shape)
    n = full.size
    region = region_subtract((full,), (Box(tuple((0, max(1, s // 2)) for s in shape)),)) or (full,)
    total = region_size(region)
    cuts = sorted(data.draw(st.lists(st.integers(0, total), max_size=4)))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    parts = split_region(region, sizes)
    idx = np.arange(n).reshape(shape)
    order = lambda bxs: [v for b in bxs for v in idx[b.slices()].reshape(-1)]
    assert [v for p in parts for v in order(p)] == order(region)
    assert [region_size(p) for p in parts] == sizes


def test_flat_range_within_box_and_padding():
    # ZeRO-3 on a rowwise TP shard: flat slices of the local (not global) flattening
    shape = (4, 6)
    local = Box(((0, 4), (3, 6)))
    piece = FlatRange(5, 12, local)
    idx = np.arange(24).reshape(shape)
    got = sorted(v for b in piece_region(piece, shape) for v in idx[b.slices()].reshape(-1))
    assert got == sorted(idx[:, 3:].reshape(-1)[5:12])
    lay = TensorLayout(shape, ((0, FlatRange(0, 7)), (1, FlatRange(7, 14)),
                               (2, FlatRange(14, 21)), (3, FlatRange(21, 28))))
    x = np.arange(24.0).reshape(shape) + 1
    last = extract(x, lay, 3)[0]
    assert last.shape == (7,) and list(last) == [22, 23, 24, 0, 0, 0, 0]   # padded at end
    assert np.array_equal(assemble(lay, shards_of(x, lay)), x)


def test_layout_for_conventions():
    mesh = DeviceMesh.range(0, 8)
    colwise = layout_for("q", (8, 6), mesh, Strategy(dp=2, tp=4), "colwise")
    assert colwise.pieces_on(1) == (Box(((2, 4), (0, 6))),)
    assert colwise.pieces_on(5) == colwise.pieces_on(1)            # dp replica
    rowwise = layout_for("o", (8, 6), mesh, Strategy(dp=4, tp=2), "rowwise")
    assert rowwise.pieces_on(3) == (Box(((0, 8), (3, 6))),)
    fsdp = layout_for("q", (8, 6), mesh, Strategy(dp=4, tp=2, zero=3), "colwise",
                      zero_format="dim0")
    assert fsdp.pieces_on(3) == (Box(((5, 6), (0, 6))),)            # dp1 chunk of tp1 rows
    ds = layout_for("q", (8, 6), mesh, Strategy(dp=8, zero=3), "colwise")
    assert ds.pieces_on(7) == (FlatRange(42, 48),)
    pp = layout_for("q", (8, 6), mesh, Strategy(dp=2, tp=2, pp=2), "colwise",
                    layer_index=3, num_layers=4)
    assert pp.gpus == (2, 3, 6, 7)                                   # last stage only
    with pytest.raises(ValueError):
        TensorLayout((4,), ((0, Box(((0, 3),))), (0, Box(((2, 4),)))))   # overlap on one GPU


def test_llama_params_names_and_count():
    ps = llama_params(64, 2, 4, 2, 96, 100)
    names = [p.name for p in ps]
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight",
                                                                      "lm_head.weight"]
    assert "model.layers.1.self_attn.k_proj.weight" in names
    k = next(p for p in ps if p.name.endswith("0.self_attn.k_proj.weight"))
    assert k.shape == (32, 64) and k.kind == "colwise"
    h, kv, ffn, v = 64, 32, 96, 100
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * ffn + 2 * h
    assert sum(math.prod(p.shape) for p in ps) == 2 * v * h + 2 * per_layer + h


# -- plans: the properties -------------------------------------------------------------------
@FAST
@given(reshard_cases(), st.integers(0, 2**31 - 1))
def test_plan_is_exact_minimal_and_beats_allgather(case, seed):
    src, dst = case
    plan = plan_transfer(src, dst, itemsize=4)
    assert plan == plan_transfer(src, dst, itemsize=4)   # deterministic, comparable data
    verify_transfer_plan(plan)                       # every dst element exactly once
    x = np.random.default_rng(seed).standard_normal(src.shape).astype(np.float32)
    assert_exact(plan, x)
    assert np.array_equal(assemble(dst, apply_plan(plan, shards_of(x, src))), x)
    assert plan.total_network_bytes <= naive_allgather_bytes(src, dst, itemsize=4)
    for g in dst.gpus:   # receives exactly what it lacks; keeps what it has (zero redundancy)
        lacks = dst.elements_on(g) - region_held_twice(dst, g, src)
        assert plan.bytes_received_by(g) == 4 * lacks
        assert plan.local_bytes_on(g) == 4 * region_held_twice(dst, g, src)
    assert sum(plan.bytes_sent_by(g) for g in src.gpus) == plan.total_network_bytes
    assert all(t.src_gpu != t.dst_gpu and t.src_gpu in src.gpus for t in plan.transfers)


@SOME
@given(reshard_cases(), st.integers(1, 300), st.booleans())
def test_buckets_fit_budget_and_replay_exactly(case, budget, per_gpu):
    src, dst = case
    plan = plan_transfer(src, dst, itemsize=4)
    budget = max(4, budget)
    buckets = bucketize(plan, budget, per_gpu=per_gpu)
    for b in buckets:
        if per_gpu:
            assert all(b.bytes_on(g) <= budget for g in set(src.gpus) | set(dst.gpus))
        else:
            assert b.nbytes <= budget
    moved = tuple(i.transfer for b in buckets for i in b.items)
    assert sum(t.nbytes for t in moved) == plan.total_network_bytes
    replay = replace(plan, transfers=moved)
    verify_transfer_plan(replay)
    assert_exact(replay, np.random.default_rng(0).standard_normal(src.shape))


@SOME
@given(st.sampled_from([2, 4, 8]), st.data())
def test_model_reshard_exact_for_small_llama(world, data):
    ps = llama_params(16, 2, 4, 2, 24, 20)
    s_src, s_dst = data.draw(strategies_of(world)), data.draw(strategies_of(world))
    disjoint = data.draw(st.booleans())
    src = model_layout(ps, DeviceMesh.range(0, world), s_src, num_layers=2,
                       zero_format=data.draw(st.sampled_from(["flat", "dim0"])))
    dst = model_layout(ps, DeviceMesh.range(world if disjoint else 0, world), s_dst,
                       num_layers=2)
    plan = plan_model_reshard(src, dst)
    rng = np.random.default_rng(1)
    for name, p in plan.plans:
        verify_transfer_plan(p)
        assert_exact(p, rng.standard_normal(p.src.shape))
    assert plan.total_network_bytes <= naive_allgather_bytes(src, dst)
    totals = plan.totals_per_gpu()
    assert sum(v.received for v in totals.values()) == plan.total_network_bytes
    assert plan.max_link_bytes == max(max(v.sent, v.received) for v in totals.values())


@SOME
@given(st.sampled_from([(2, 2, 1, 1), (4, 1, 2, 1), (4, 2, 1, 1), (2, 2, 2, 1), (4, 2, 2, 2),
                        (8, 1, 2, 1), (2, 2, 1, 2)]), st.sampled_from([1, 2]))
def test_zero_redundancy_mesh_contains_training_shard(degrees, dp):
    t, p, t_g, p_g = degrees
    train = Strategy(dp=dp, tp=t, pp=p)
    gen = Strategy(dp=dp * (t // t_g) * (p // p_g), tp=t_g, pp=p_g)
    mesh = DeviceMesh.range(0, train.world)
    ps = llama_params(16, 4, 4, 4, 32, 32)
    src = model_layout(ps, mesh, train, num_layers=4)
    dst = model_layout(ps, zero_redundancy_mesh(mesh, train, gen), gen, num_layers=4)
    plan = plan_model_reshard(src, dst)
    for g in mesh.gpus:   # all of a GPU's training shard is reused in place
        assert plan.local_bytes_on(g) == 2 * src.elements_on(g)


# -- balancing and placement preferences ----------------------------------------------------
def test_single_receiver_spreads_over_replicas():
    src = layout_for("w", (64, 16), DeviceMesh.range(0, 4), Strategy(dp=4), "colwise")
    dst = layout_for("w", (64, 16), DeviceMesh((7,)), Strategy(), "colwise")
    plan = plan_transfer(src, dst)
    assert [plan.bytes_sent_by(g) for g in range(4)] == [512] * 4
    assert_exact(plan, np.arange(64 * 16.0).reshape(64, 16))


def test_many_receivers_take_whole_chunks():
    src = layout_for("w", (8, 8), DeviceMesh.range(0, 4), Strategy(dp=4), "colwise")
    dst = layout_for("w", (8, 8), DeviceMesh.range(4, 4), Strategy(dp=4), "colwise")
    plan = plan_transfer(src, dst)
    assert len(plan.transfers) == 4 and plan.max_link_bytes == 128


def test_same_node_senders_preferred():
    node_of = lambda g: g // 8
    src = layout_for("w", (8, 8), DeviceMesh((0, 1, 8, 9)), Strategy(dp=2, tp=2), "colwise")
    dst = layout_for("w", (8, 8), DeviceMesh((10, 11)), Strategy(tp=2), "rowwise")
    plan = plan_transfer(src, dst, node_of=node_of)
    assert {t.src_gpu for t in plan.transfers} == {8, 9}
    assert_exact(plan, np.arange(64.0).reshape(8, 8))
    far = plan_transfer(src, dst)
    assert {t.src_gpu for t in far.transfers} & {0, 1}      # without node_of it balances


def test_bandwidth_weights_senders():
    src = layout_for("w", (64, 4), DeviceMesh((0, 1)), Strategy(dp=2), "colwise")
    dst = layout_for("w", (64, 4), DeviceMesh((2,)), Strategy(), "colwise")
    plan = plan_transfer(src, dst, lambda s, d: 3.0 if s == 0 else 1.0)
    assert plan.bytes_sent_by(0) == 3 * plan.bytes_sent_by(1)


# -- HybridFlow reference case -------------------------------------------------------------
def test_hybridflow_reference_case_8_gpus():
    """Training tp=4 × dp=2 → generation tp=2 (micro-dp 2) on the same 8 GPUs (§5.3–5.4)."""
    mesh = DeviceMesh.range(0, 8)
    train, gen = Strategy(dp=2, tp=4), Strategy(dp=4, tp=2)
    gen_mesh = zero_redundancy_mesh(mesh, train, gen)
    # paper (1-based): TP groups [G1,G3],[G2,G4],[G5,G7],[G6,G8]; micro-DP [G1,G2],[G3,G4]
    tp_groups = [gen_mesh.gpus[i:i + 2] for i in range(0, 8, 2)]
    assert tp_groups == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert [tp_groups[0][0], tp_groups[1][0]] == [0, 1]

    ps = llama_params(32, 2, 4, 4, 64, 48)
    src = model_layout(ps, mesh, train, num_layers=2)
    dst = model_layout(ps, gen_mesh, gen, num_layers=2)
    plan = plan_model_reshard(src, dst)
    M = 2 * sum(math.prod(p.shape) for p in ps)
    sharded = 2 * sum(math.prod(p.shape) for p in ps if p.kind != "replicate")
    ref = hybridflow_traffic(M, t=4, p=1, d=2, t_g=2, p_g=1)
    for g in mesh.gpus:
        got = plan.bytes_received_by(g)
        assert got == sharded // 4          # (d_g − 1)/(t·p) of what is sharded
        assert got <= ref.zero_redundancy < ref.consecutive < ref.deepspeed_chat
    assert plan.max_link_bytes == sharded // 4
    naive = naive_allgather_bytes_by_gpu(src, dst)
    assert all(plan.bytes_received_by(g) < naive[g] for g in mesh.gpus)

    # the same switch without the grouping: some GPU's generation shard misses its own
    # training shard and must fetch the whole half
    plain = plan_model_reshard(src, model_layout(ps, mesh, gen, num_layers=2))
    assert plain.max_link_bytes == sharded // 2 > plan.max_link_bytes
    rng = np.random.default_rng(2)
    for _, p in plan.plans:
        assert_exact(p, rng.standard_normal(p.src.shape))


def test_hybridflow_formulas_70b():
    f = hybridflow_traffic(140e9, t=8, p=1, d=2, t_g=2, p_g=1)
    assert f.deepspeed_chat == pytest.approx(131.25e9)
    assert f.consecutive == pytest.approx(122.5e9)
    assert f.zero_redundancy == pytest.approx(52.5e9)


def test_llama2_70b_shapes_reach_the_zero_redundancy_figure():
    ps = llama_params(8192, 80, 64, 8, 28672, 32000)
    mesh = DeviceMesh.range(0, 16)
    train, gen = Strategy(dp=2, tp=8), Strategy(dp=8, tp=2)
    src = model_layout(ps, mesh, train, num_layers=80)
    dst = model_layout(ps, zero_redundancy_mesh(mesh, train, gen), gen, num_layers=80)
    plan = plan_model_reshard(src, dst)
    sharded = 2 * sum(math.prod(p.shape) for p in ps if p.kind != "replicate")
    assert {v.received for v in plan.totals_per_gpu().values()} == {sharded * 3 // 8}
    assert plan.max_link_bytes == pytest.approx(52.5e9, rel=0.02)   # M ≈ 138 GB, not 140
