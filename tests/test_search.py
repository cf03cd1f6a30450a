"""Placement search and the compiler at planning size: properties over random clusters and
steps, auto against brute force, pins, and the error when nothing fits.

Properties (hypothesis, a few examples each run; GRAPHRL_HYPOTHESIS_EXAMPLES raises it):
every pass's output verifies, compiling twice gives the same plan, the plan verifies (no
deadlock, matched send/recv, no GPU over memory), auto is never slower than another
policy, and the plan's simulated step agrees with the search's within 10%. A case where
nothing fits must say which call needs how many GiB.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache

import pytest
from hypothesis import given, settings, strategies as st

import graphrl as gr
from conftest import load_build
from graphrl.cluster import ClusterSpec, gpu_type
from graphrl.cli.compile import POLICY_NAMES
from graphrl.compiler import DEFAULT_PIPELINE, compile_graph
from graphrl.dump import plan_text
from graphrl.graph import Placement
from graphrl.parallel import DeviceMesh, Strategy
from graphrl.passes import policies
from graphrl.passes.assign_devices import problem_from_graph
from graphrl.passes.base import PassContext, parse_pipeline, run_pipeline
from graphrl.passes.bound import step_lower_bound
from graphrl.passes.search import DEFAULT_HEADROOM
from graphrl.passes.lower import lower
from graphrl.simulate import simulate
from graphrl.verify import verify_graph, verify_plan

CALL = re.compile(r"\b(policy|reference|reward|critic)\.(generate|forward|train)\b")
GIB = re.compile(r"(\d+(?:\.\d+)?) GiB")
EXAMPLES = int(os.environ.get("GRAPHRL_HYPOTHESIS_EXAMPLES", "12"))


@lru_cache(maxsize=None)
def planning_graph(example: str, size: str, prompt: int = 256, response: int = 256,
                   batch: int = 64):
    opts = gr.RunOptions(model_size=size, prompt_len=prompt, response_len=response,
                         batch_size=batch)
    return load_build(example)(opts).program().graph


def compile_or_error(graph, cluster, policy, **kw):
    try:
        return compile_graph(graph, cluster, policy, gen_engine="graph", **kw), None
    except gr.UsageError as e:
        return None, str(e)


# -- properties -------------------------------------------------------------------------
clusters = st.builds(lambda n, g, t: ClusterSpec(n, g, gpu_type(t)),
                     st.integers(1, 4), st.sampled_from([1, 2, 4, 8]),
                     st.sampled_from(["A100", "H100", "H200"]))
steps = st.tuples(st.sampled_from(["ppo", "grpo"]),
                  st.sampled_from(["7b", "13b", "policy=13b,reward=7b", "7b,policy=13b"]),
                  st.sampled_from([128, 256]), st.sampled_from([128, 256]),
                  st.sampled_from([64, 128, 192, 256]))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(step=steps, cluster=clusters)
def test_compiled_plans_are_valid_deterministic_and_auto_is_best(step, cluster):
    graph = planning_graph(*step)
    compiled, errors = {}, {}
    for policy in POLICY_NAMES:
        compiled[policy], errors[policy] = compile_or_error(graph, cluster, policy)
    # infeasible: one line naming the call, what it needs and what a GPU has (a policy
    # whose pools are too small while every call fits somewhere names itself instead)
    for policy, message in errors.items():
        if message is None:
            continue
        assert "\n" not in message, message
        names_call = CALL.search(message) and len(GIB.findall(message)) == 2
        host = "host RAM" in message and len(GIB.findall(message)) == 2
        assert names_call or host or (policy != "auto" and f"under policy {policy}" in message), message
        if names_call:
            need, have = map(float, GIB.findall(message))
            assert need > have == pytest.approx(cluster.gpu.memory_gib * (1 - DEFAULT_HEADROOM),
                                                abs=0.05), message
    if compiled["auto"] is None:
        assert not any(compiled.values()), "auto found nothing where another policy did"
        return
    # every pass's output verifies (compile_graph checks too; here explicitly), and a
    # second compilation gives the same plan
    ctx = PassContext(cluster, gen_engine="graph")
    seen = []
    spec = DEFAULT_PIPELINE.format(policy="auto", search="false")
    again = run_pipeline(graph, parse_pipeline(spec), ctx,
                         on_pass=lambda name, ir: seen.append(
                             (name, verify_plan(ir) if name == "lower" else verify_graph(ir))))
    assert [name for name, _ in seen] == ["assign-devices", "choose-overlap", "insert-reshard",
                                          "price-stream", "lower"]
    placed = seen[3][1]
    auto = compiled["auto"]
    assert placed == auto.graph
    assert plan_text(again) == plan_text(auto.plan)
    assert again.to_json() == auto.plan.to_json()
    best = auto.evaluation.step_seconds
    bound = step_lower_bound(problem_from_graph(graph, ctx))
    assert bound is None or bound <= best + 1e-9, (bound, best)   # a valid lower bound
    capacity = cluster.gpu.memory_bytes
    for policy, c in compiled.items():
        if c is None:
            continue
        verify_graph(c.graph)
        verify_plan(c.plan)
        assert all(i.mem <= capacity for _, i in c.plan.instrs())
        ev = c.evaluation
        assert best <= ev.step_seconds + 1e-9, (policy, best, ev.step_seconds)
        _, step_s = simulate(c.plan)
        assert step_s == c.plan.predicted_step_seconds
        assert step_s == pytest.approx(ev.step_seconds, rel=0.10), (policy, ev.stream)


# -- auto against exhaustive search -----------------------------------------------------
@lru_cache(maxsize=None)
def brute_force(example: str, cluster: str):
    """The exhaustive search's optimum for the 7b step on `cluster` (the slowest search
    here: computed once for this test and the lower bound's)."""
    graph = planning_graph(example, "7b", 512, 512, 64)
    ctx = PassContext(ClusterSpec.parse(cluster), gen_engine="graph")
    return policies.brute_force(problem_from_graph(graph, ctx))


@pytest.mark.xdist_group("brute_force")   # one worker: brute_force() runs once a case
@pytest.mark.parametrize("example, cluster", [("grpo", "1x4xH100"), ("ppo", "2x2xH100")])
def test_auto_matches_brute_force_on_small_clusters(example, cluster):
    graph = planning_graph(example, "7b", 512, 512, 64)
    ctx = PassContext(ClusterSpec.parse(cluster), gen_engine="graph")
    auto = policies.auto(problem_from_graph(graph, ctx))
    brute = brute_force(example, cluster)
    assert auto is not None and brute is not None
    assert auto.step_seconds == pytest.approx(brute.step_seconds, abs=1e-9)
    bound = step_lower_bound(problem_from_graph(graph, ctx))
    assert bound is not None and bound <= brute.step_seconds + 1e-9, (bound, brute.step_seconds)


# -- pins -------------------------------------------------------------------------------
H100x8 = ClusterSpec.parse("1x8xH100")


def placed(compiled, call):
    return next(n for n in compiled.graph.calls() if n.call == call).placement


def test_a_pin_is_honoured():
    pin = {"gpus": "0-3", "dp": 2, "tp": 2, "pp": 1, "zero": 3}
    c, err = compile_or_error(planning_graph("ppo", "7b"), H100x8, "auto",
                              placement={"policy.train": pin})
    assert err is None, err
    p = placed(c, "policy.train")
    assert p.mesh == DeviceMesh.parse("0-3")
    assert (p.strategy.dp, p.strategy.tp, p.strategy.pp, p.strategy.zero) == (2, 2, 1, 3)
    assert placed(c, "policy.forward").mesh == p.mesh   # the model's unit follows the pin
    verify_plan(c.plan)


def test_pinned_strategy_fields_alone_are_honoured():
    c, err = compile_or_error(planning_graph("ppo", "7b"), H100x8, "auto",
                              placement={"critic.train": {"tp": 2, "zero": 1}})
    assert err is None, err
    s = placed(c, "critic.train").strategy
    assert (s.tp, s.zero) == (2, 1)


@pytest.mark.parametrize("placement, call, why", [
    ({"policy.sample": {"gpus": "0-3"}}, "policy.sample", "no such call"),
    ({"policy.train": {"gpu": "0-3"}}, "policy.train", "unknown key"),
    ({"policy.train": {"gpus": "0-15"}}, "policy.train", "outside the cluster"),
    ({"policy.train": {"gpus": "0-3", "dp": 2, "tp": 1, "pp": 1}}, "policy.train",
     "= 2, not the 4 GPUs"),
    ({"policy.forward": {"gpus": "0-3"}, "policy.train": {"gpus": "4-7"}}, "policy.train",
     "forward and train share one mesh"),
    ({"policy.train": {"gpus": "0-3", "tp": "two"}}, "policy.train", "must be an integer"),
    ({"policy.train": {"gpus": "0-3", "tp": 3}}, "policy.train", "no dp x tp x pp split"),
    ({"policy.train": "0-3"}, "policy.train", "expected a mapping"),
])
def test_bad_pins_name_the_pinned_call(placement, call, why):
    _, err = compile_or_error(planning_graph("ppo", "7b"), H100x8, "auto", placement=placement)
    assert err is not None and "\n" not in err
    assert f"placement {call!r}" in err and why in err, err


def test_a_pin_that_cannot_fit_says_what_it_needs():
    _, err = compile_or_error(planning_graph("ppo", "70b"), H100x8, "auto",
                              placement={"policy.train": {"gpus": "0"}})
    assert err is not None and err.startswith("placement 'policy.train': ")
    need, have = map(float, GIB.findall(err))
    assert need > have == pytest.approx(80.0 * (1 - DEFAULT_HEADROOM), abs=0.05), err
    assert "pinned to GPUs 0" in err


# -- nothing fits -----------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_infeasible_placement_names_call_memory_and_smallest_cluster(policy):
    graph = planning_graph("ppo", "70b")
    _, err = compile_or_error(graph, ClusterSpec.parse("1x8xA100"), policy)
    assert err is not None and "\n" not in err
    # policy.train fits its GPUs by offloading the optimizer (or the models are swapped
    # out between calls), but the node's host RAM cannot hold what that offloads
    if policy == "split":   # every call fits somewhere, its pools are what is too small
        assert err.startswith("no placement fits on 1x8xA100-80G under policy split;"), err
    else:
        assert err.startswith("no placement fits on 1x8xA100-80G: node 0's host RAM: "), err
        need, have = map(float, GIB.findall(err))
        assert need > have == pytest.approx(8 * 256 * (1 - DEFAULT_HEADROOM), abs=0.05), err
    m = re.search(r"the smallest cluster that fits: (\S+)$", err)
    # 2 nodes with optimizer offload (colocated policies); split needs its pools doubled
    assert m and m.group(1) in ("2x8xA100-80G", "4x8xA100-80G"), err
    if policy == "colocate-all":   # and the suggestion holds
        c, err2 = compile_or_error(graph, ClusterSpec.parse(m.group(1)), policy)
        assert err2 is None, err2


def test_infeasible_even_when_the_whole_cluster_admits_no_strategy():
    """1x3 GPUs: no dp x tp x pp split of all 3 GPUs of one node divides a 70B model and a
    batch of 128 (uneven dp splits are for meshes of whole nodes), so the error reports
    the call at the mesh size where it comes closest (2 GPUs, even with recomputation and
    the optimizer offloaded)."""
    _, err = compile_or_error(planning_graph("grpo", "70b", 512, 256, 128),
                              ClusterSpec.parse("1x3xA100"), "auto")
    assert err is not None and CALL.search(err), err
    need, have = map(float, GIB.findall(err))
    assert need > have == pytest.approx(80.0 * (1 - DEFAULT_HEADROOM), abs=0.05)
    assert "(on 2 GPUs)" in err and "after 8% headroom" in err


# -- the search's own pieces ------------------------------------------------------------
def test_search_evaluation_is_consistent_with_its_assignment():
    graph = planning_graph("ppo", "7b")
    ctx = PassContext(H100x8, gen_engine="graph")
    problem = problem_from_graph(graph, ctx)
    ev = policies.colocate_all(problem)
    assert ev is not None
    assert {u for u, _ in ev.assignment} == set(problem.units)
    assert all(m == DeviceMesh.range(0, 8) for _, m in ev.assignment)
    by_name = {s.name: s for s in ev.schedule}
    for c in problem.calls:   # list scheduling: after its inputs, on its unit's mesh
        s = by_name[c.name]
        assert all(s.start >= by_name[d].end - 1e-12 for d in c.deps)
        if s.mesh is not None:
            assert s.mesh == ev.mesh_of(c.unit)
            assert s.choice.strategy.world == s.mesh.size
            assert s.choice.peak_bytes <= H100x8.gpu.memory_bytes
    assert ev.step_seconds == max(s.end for s in ev.schedule)
    # calls sharing GPUs never overlap in time
    calls = [s for s in ev.schedule if s.mesh is not None]
    for i, a in enumerate(calls):
        for b in calls[i + 1:]:
            if a.mesh.overlaps(b.mesh):
                assert min(a.end, b.end) <= max(a.start, b.start) + 1e-12, (a.name, b.name)


def test_placement_of_generation_reuses_training_gpus_only_when_shared():
    train = Placement(DeviceMesh.range(0, 8), Strategy(dp=2, tp=4))
    from graphrl.passes.insert_reshard import generation_placement

    apart = Placement(DeviceMesh.range(8, 8), Strategy(dp=4, tp=2))
    assert generation_placement(train, apart) == apart
    same = generation_placement(train, Placement(DeviceMesh.range(0, 8), Strategy(dp=4, tp=2)))
    assert set(same.mesh.gpus) == set(range(8)) and same.strategy == Strategy(dp=4, tp=2)


# -- the lower bound --------------------------------------------------------------------
@pytest.mark.xdist_group("brute_force")   # one worker: brute_force() runs once a case
@pytest.mark.parametrize("example, cluster", [("grpo", "1x4xH100"), ("ppo", "2x2xH100")])
def test_lower_bound_is_below_the_optimum_and_not_trivial(example, cluster):
    from graphrl.passes.bound import step_lower_bound

    graph = planning_graph(example, "7b", 512, 512, 64)
    problem = problem_from_graph(graph, PassContext(ClusterSpec.parse(cluster),
                                                    gen_engine="graph"))
    bound = step_lower_bound(problem)
    best = brute_force(example, cluster).step_seconds
    assert bound is not None and bound <= best
    # generation alone at its best is part of it: the bound is more than half the optimum
    assert bound > 0.5 * best


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(["ppo", "grpo"]), st.sampled_from(["7b", "13b"]),
       st.sampled_from(["1x8xH100", "2x8xH100", "4x8xA100"]))
def test_no_policy_beats_the_lower_bound(example, size, cluster):
    from graphrl.passes.bound import step_lower_bound

    graph = planning_graph(example, size, 512, 512, 64)
    problem = problem_from_graph(graph, PassContext(ClusterSpec.parse(cluster),
                                                    gen_engine="graph"))
    bound = step_lower_bound(problem)
    for name, policy in policies.POLICIES.items():
        ev = policy(problem)
        if ev is not None:
            assert bound <= ev.step_seconds * (1 + 1e-9), name


def test_auto_is_not_beaten_on_the_lowered_plan_of_a_close_case():
    """auto's finalists are ranked on lowered plans with the same (exact) reshard plans
    the pipeline uses: here the closed form once ranked auto 0.6% behind hybridflow."""
    graph = planning_graph("ppo", "7b", 128, 256, 64)
    cluster = ClusterSpec.parse("2x8xH100")
    auto = compile_graph(graph, cluster, "auto", gen_engine="graph")
    hybrid = compile_graph(graph, cluster, "hybridflow", gen_engine="graph")
    assert auto.plan.predicted_step_seconds <= hybrid.plan.predicted_step_seconds * (1 + 1e-9)
