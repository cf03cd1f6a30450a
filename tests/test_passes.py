"""The compiler passes, each tested three ways (DESIGN.md, "Testing habits"): run the pass,
verify its output, assert its structure (golden text for the compiled graph and the plan),
and execute the pass's input and output on the local backend and compare.

The subject is the tiny PPO example compiled for 1x4xcpu, once with policy auto and once
with pins that put policy.train on GPUs 0-1 and policy.generate on 2-3 (so weights move
between disjoint GPU sets). Golden files live in tests/golden/; rerun with
GRAPHRL_UPDATE_GOLDEN=1 to accept a change after reading its diff.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path

import pytest

import graphrl as gr
from conftest import load_build
from graphrl.cluster import ClusterSpec
from graphrl.compiler import compile_graph
from graphrl.dump import plan_text
from graphrl.graph import CALL, OP, SYSTEM, Placement
from graphrl.parallel import DeviceMesh, Strategy
from graphrl.passes.assign_devices import AssignDevices, parse_pins
from graphrl.passes.base import PassContext, parse_pipeline, pipeline_text
from graphrl.passes.registry import PASSES as PASSES_BY_NAME
from graphrl.passes.choose_overlap import ChooseOverlap
from graphrl.passes.insert_reshard import InsertReshard, generation_placement, plan_traffic
from graphrl.passes.lower import lower
from graphrl.plan import HOST, Plan
from graphrl.simulate import simulate
from graphrl.errors import GraphError
from graphrl.verify import verify_graph, verify_plan

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE_ENV = "GRAPHRL_UPDATE_GOLDEN"
CLUSTER = ClusterSpec.parse("1x4xcpu")
PINS = {"policy.train": {"gpus": "0-1"}, "policy.generate": {"gpus": "2-3"}}
CASES = {"auto": {}, "pinned": PINS}
PASSES = ("assign-devices", "choose-overlap", "insert-reshard")
ITERATIONS = 2
SEED = 0


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get(UPDATE_ENV):
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"no golden file tests/golden/{name}; run with {UPDATE_ENV}=1 to write it",
                    pytrace=False)
    golden = path.read_text()
    if text != golden:
        diff = "".join(difflib.unified_diff(golden.splitlines(keepends=True),
                                            text.splitlines(keepends=True),
                                            f"tests/golden/{name}", "now"))
        pytest.fail(f"{name} differs from the golden file (read the diff; rerun with "
                    f"{UPDATE_ENV}=1 to accept):\n{diff}", pytrace=False)


# -- fixtures: the example, each pass's output, and local runs --------------------------
@pytest.fixture(scope="module")
def ppo():
    return load_build("ppo")(gr.RunOptions(batch_size=4))


@pytest.fixture(scope="module")
def program(ppo):
    return ppo.program()


@pytest.fixture(scope="module", params=list(CASES))
def stages(request, program):
    """The traced graph, the output of each pass run one at a time, the plan, and the
    context they shared."""
    graph = program.graph
    before = graph.text()
    ctx = PassContext(CLUSTER, pins=parse_pins(CASES[request.param], graph, CLUSTER))
    out = {"case": request.param, "traced": graph, "ctx": ctx}
    for p in (AssignDevices("auto"), ChooseOverlap(), InsertReshard()):
        out[p.name] = p.run(graph, ctx)
        graph = out[p.name]
    out["plan"] = lower(graph, ctx.cluster)
    assert program.graph.text() == before, "a pass mutated its input"
    return out


def execute(ppo, program):
    """Run ITERATIONS steps; the outputs of each step and every model's final weights.
    One torch thread: these models are tiny, and on a shared 2-core machine two threads
    contending with other processes make a step 30x slower."""
    import torch

    from graphrl.backends.local import LocalExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ex = LocalExecutor(program, seed=SEED)
        outputs = [ex.run_step(ppo.data(i), iteration=i).outputs for i in range(ITERATIONS)]
        return outputs, {m: e.export_weights() for m, e in ex.engines.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_run(ppo, program):
    return execute(ppo, program)


def assert_same_run(a, b) -> None:
    import torch

    (outs_a, weights_a), (outs_b, weights_b) = a, b
    for i, (oa, ob) in enumerate(zip(outs_a, outs_b, strict=True)):
        assert oa.keys() == ob.keys()
        for name, payload in oa.items():
            assert payload.keys() == ob[name].keys()
            for field, t in payload.items():
                assert torch.equal(t, ob[name][field]), (i, name, field)
    assert weights_a.keys() == weights_b.keys()
    for model, ws in weights_a.items():
        assert ws.keys() == weights_b[model].keys()
        for k, t in ws.items():
            assert torch.equal(t, weights_b[model][k]), (model, k)


def node(graph, call):
    return next(n for n in graph.nodes if n.call == call)


# -- assign-devices ---------------------------------------------------------------------
def test_assign_devices_places_every_call(stages):
    traced, g = stages["traced"], stages["assign-devices"]
    verify_graph(g)
    assert [n.name for n in g.nodes] == [n.name for n in traced.nodes]
    assert [dataclasses.replace(n, placement=None, timing=None) for n in g.nodes] == list(traced.nodes)
    for n in g.nodes:
        if n.kind == OP:
            assert n.placement is None, n.name   # ops run on the host
            continue
        p = n.placement
        assert isinstance(p, Placement), n.name
        assert set(p.mesh.gpus) <= set(range(CLUSTER.num_gpus))
        assert p.strategy.world == p.mesh.size, (n.name, p.text())
        if n.target != "train":
            assert p.strategy.zero == 0, n.name
    for model in ("policy", "critic"):   # a model's forward and train share one mesh
        assert (node(g, f"{model}.forward").placement.mesh
                == node(g, f"{model}.train").placement.mesh)
    ev = stages["ctx"].search.evaluation
    placed = {s.name: s for s in ev.schedule if s.mesh is not None}
    assert {n.name for n in g.calls()} == set(placed)
    for n in g.calls():
        assert n.placement == Placement(placed[n.name].mesh, placed[n.name].choice.strategy)


def test_assign_devices_honours_the_pins(stages):
    g = stages["assign-devices"]
    if stages["case"] == "pinned":
        assert node(g, "policy.train").placement.mesh == DeviceMesh.parse("0-1")
        assert node(g, "policy.forward").placement.mesh == DeviceMesh.parse("0-1")
        assert node(g, "policy.generate").placement.mesh == DeviceMesh.parse("2-3")
    else:
        assert g.schedule.policy == "auto"


# -- choose-overlap ---------------------------------------------------------------------
def test_choose_overlap_only_labels_parallel_groups(stages):
    before, g = stages["assign-devices"], stages["choose-overlap"]
    verify_graph(g)
    assert [dataclasses.replace(n, group="") for n in g.nodes] == list(before.nodes)
    ev = stages["ctx"].search.evaluation
    sched = {s.name: s for s in ev.schedule}
    groups: dict[str, list] = {}
    for n in g.nodes:
        if n.group:
            assert n.kind == CALL, n.name
            groups.setdefault(n.group, []).append(n)
    assert groups, "the tiny PPO step always has calls side by side on disjoint meshes"
    for label, members in groups.items():
        assert len(members) >= 2, label
        for a in members:   # each member overlaps in time with a member on other GPUs
            sa = sched[a.name]
            assert any(not a.placement.mesh.overlaps(b.placement.mesh)
                       and min(sa.end, sched[b.name].end) - max(sa.start, sched[b.name].start)
                       > 0 for b in members if b is not a), (label, a.name)
    assert g.schedule == before.schedule and g.schedule.stream == ev.stream
    assert g.schedule.offloaded_gpus == ev.offloaded_gpus == ()  # tiny models


# -- insert-reshard ---------------------------------------------------------------------
def test_insert_reshard_moves_the_trained_weights_into_the_generation_layout(stages):
    before, g = stages["choose-overlap"], stages["insert-reshard"]
    verify_graph(g)
    reshards = [n for n in g.nodes if n.target == "reshard"]
    assert [(n.kind, n.model) for n in reshards] == [(SYSTEM, "policy")]  # critic: no generate
    rs = reshards[0]
    gen = node(g, "policy.generate")
    train = node(g, "policy.train")
    assert g.nodes.index(rs) == g.nodes.index(gen) - 1
    assert rs.inputs == ("%policy@0",) and rs.outputs[0].name == "%policy@0.gen"
    assert gen.inputs[0] == "%policy@0.gen"
    assert node(g, "policy.forward").inputs[0] == "%policy@0" == train.inputs[0]
    # only the reshard is new; generation may be reordered for zero-redundancy grouping
    assert [n for n in g.nodes if n is not rs and n.name != gen.name] == [
        n for n in before.nodes if n.name != gen.name]
    old_gen = node(before, "policy.generate").placement
    assert gen.placement == rs.placement == generation_placement(train.placement, old_gen)
    assert rs.attr("src") == f"{train.placement.mesh.text()}:{train.placement.strategy.text()}"
    # on a cpu cluster the engines keep float32 weights: the plan counts 4 bytes a weight
    spec = dataclasses.replace(g.model("policy").spec, dtype="fp32")
    traffic = plan_traffic(spec, train.placement, gen.placement)
    assert rs.attr("sent") == traffic.sent_text()
    assert rs.attr("max_link_bytes") == traffic.max_link_bytes
    assert rs.attr("network_bytes") == traffic.total_bytes
    # every generation GPU ends up holding its shard; nobody receives more than that
    shard = spec.weight_bytes // (gen.placement.strategy.tp * gen.placement.strategy.pp)
    received = dict(traffic.received)
    assert all(received[gpu] <= shard for gpu in gen.placement.mesh.gpus)
    assert traffic.max_link_bytes <= spec.weight_bytes
    if stages["case"] == "pinned":   # disjoint GPU sets: each generation GPU gets it all
        assert gen.placement.mesh == DeviceMesh.parse("2-3")
        assert [received[g_] for g_ in (2, 3)] == [shard, shard]
        assert traffic.total_bytes == 2 * shard
        assert sum(dict(traffic.sent).get(g_, 0) for g_ in (0, 1)) == 2 * shard


# -- lower ------------------------------------------------------------------------------
def test_lower_gives_verified_per_worker_streams(stages):
    g, plan = stages["insert-reshard"], stages["plan"]
    verify_plan(plan)
    assert plan.graph == g and plan.cluster == CLUSTER and plan.policy == "auto"
    runs: dict[str, set[int]] = {}
    for w, i in plan.instrs():
        if i.op == "run":
            runs.setdefault(i.node, set()).add(w)
    for n in g.nodes:
        if n.kind == CALL:
            assert runs[n.name] == set(n.placement.mesh.gpus), n.name   # a gang
        elif n.kind == OP:
            assert runs[n.name] == {HOST}, n.name
    rs = next(n for n in g.nodes if n.target == "reshard")
    src = DeviceMesh.parse(str(rs.attr("src")).split(":")[0])
    reshard_workers = {w for w, i in plan.instrs() if i.op == "reshard"}
    assert reshard_workers == set(src.gpus) | set(rs.placement.mesh.gpus)
    # a value made elsewhere arrives at the reading mesh's first GPU before the run
    for n in g.calls():
        first = n.placement.mesh.gpus[0]
        leader = plan.stream(first).instrs
        run_at = next(k for k, i in enumerate(leader) if i.op == "run" and i.node == n.name)
        for value in n.inputs:
            producer = g.producers().get(value)
            if g.value(value).spec.is_weights or (
                    producer is not None and producer.placement is not None
                    and first in producer.placement.mesh.gpus):
                continue
            assert any(i.op == "recv" and (i.value == value or i.value.startswith(value + "["))
                       for i in leader[:run_at]), (n.name, value)   # whole, or streamed parts
    _, step = simulate(plan)
    assert step == plan.predicted_step_seconds > 0
    search = stages["ctx"].search.evaluation.step_seconds
    assert plan.predicted_step_seconds == pytest.approx(search, rel=0.10)
    assert plan_text(Plan.from_json(plan.to_json())) == plan_text(plan)


def lower_assignment(size: str, cluster: str, assignment: dict[str, str], stream: int):
    """Plan PPO at planning size for a fixed unit -> mesh assignment and streaming factor
    (what assign-devices would do had the search picked them): (plan, evaluation)."""
    from graphrl.passes.assign_devices import placed_graph, problem_from_graph, schedule_of

    graph = load_build("ppo")(gr.RunOptions(model_size=size, prompt_len=256, response_len=256,
                                            batch_size=64)).program().graph
    ctx = PassContext(ClusterSpec.parse(cluster), gen_engine="graph")
    problem = problem_from_graph(graph, ctx)
    ev = problem.evaluate({u: DeviceMesh.parse(m) for u, m in assignment.items()}, stream)
    graph = placed_graph(graph, ev, schedule_of(ev, ctx, "manual"))
    graph = InsertReshard().run(ChooseOverlap().run(graph, ctx), ctx)
    return verify_plan(lower(graph, ctx.cluster)), ev


def test_streamed_rollouts_cross_once_per_part_and_the_plan_keeps_pace():
    """Regression: with k=8 micro-batches and two readers on one mesh (reward, critic),
    lower sent each rollout part once per reader under one rendezvous key, which merged
    the transfers into one group and deadlocked; and it sent the parts only after the
    whole generation, so the plan never streamed."""
    plan, ev = lower_assignment("13b", "2x8xH100", {
        "policy.generate": "0-7", "policy": "0-7", "reference": "8-11", "reward": "12-15",
        "critic": "12-15"}, stream=8)
    assert ev.stream == 8
    sends = [(w, i.value, i.peer) for w, i in plan.instrs() if i.op == "send"]
    assert len(sends) == len(set(sends))
    parts = [(i.value, i.peer) for i in plan.stream(0).instrs if i.op == "send" and "[" in i.value]
    assert sorted(parts) == sorted((f"%rollout[{k}/8]", peer) for k in range(1, 9)
                                   for peer in (8, 12))
    gen_parts = [k for k, i in enumerate(plan.stream(0).instrs)
                 if i.op == "run" and i.node == "%rollout"]
    first_send = next(k for k, i in enumerate(plan.stream(0).instrs) if i.op == "send")
    assert gen_parts[0] < first_send < gen_parts[1]   # part 1 leaves before part 2 is made
    assert plan.predicted_step_seconds == pytest.approx(ev.step_seconds, rel=0.10)


def test_transfers_leave_when_ready_not_when_the_reader_is_lowered():
    """Regression: values moved when their reader was lowered, in graph order, so a
    sender on offloaded, colocated GPUs waited for unrelated calls (plan 33% slower than
    the search's schedule)."""
    plan, ev = lower_assignment("13b", "1x8xH100", {
        "policy.generate": "0-3", "policy": "0-3", "reference": "0-3", "reward": "4-7",
        "critic": "4-7"}, stream=1)
    assert ev.offloaded_gpus == tuple(range(8))
    assert plan.predicted_step_seconds == pytest.approx(ev.step_seconds, rel=0.02)


def test_compile_graph_is_the_passes_in_a_row(stages):
    compiled = compile_graph(stages["traced"], CLUSTER, "auto",
                             placement=CASES[stages["case"]])
    assert compiled.graph == stages["insert-reshard"]
    assert compiled.plan.to_json() == stages["plan"].to_json()
    assert [name for name, _ in compiled.timings] == [*PASSES, "price-stream", "lower"]


# -- golden text ------------------------------------------------------------------------
def test_compiled_graph_matches_golden(stages):
    check_golden(f"ppo_1x4xcpu_{stages['case']}.graph.txt", stages["insert-reshard"].text())


def test_plan_text_matches_golden(stages):
    check_golden(f"ppo_1x4xcpu_{stages['case']}.plan.txt", plan_text(stages["plan"]))


def test_golden_plans_read_as_intended():
    """What a person checks when accepting the golden files, as assertions."""
    auto = (GOLDEN / "ppo_1x4xcpu_auto.plan.txt").read_text()
    pinned = (GOLDEN / "ppo_1x4xcpu_pinned.plan.txt").read_text()
    for text in (auto, pinned):
        assert text.startswith("plan @ppo_step\n  cluster    1x4xcpu\n  policy     auto\n")
        assert "system reshard[policy](%policy@0)" in text
        assert "call generate[policy](%policy@0.gen, %prompts)" in text
        assert "== clock (simulated step" in text and "deadlock" not in text
    assert "@[2-3]{dp=2,tp=1,pp=1}" in pinned.split("%rollout = call generate")[1].split("\n")[0]
    assert "train[policy]" in pinned and "@[0-1]{dp=2" in pinned.split(
        "call train[policy]")[1].split("\n")[0]


# -- execution: each pass's output runs exactly like the traced step --------------------
@pytest.mark.parametrize("after", PASSES)
def test_pass_output_executes_like_the_traced_step(stages, after, ppo, program,
                                                   reference_run):
    """The local backend runs a placed graph as it runs the traced one (placements and
    groups are annotations; a reshard is the identity in one process): the same outputs
    and the same final weights, bit for bit, over two iterations with one seed."""
    compiled = dataclasses.replace(program, graph=stages[after])
    assert_same_run(reference_run, execute(ppo, compiled))


def test_lowered_plan_keeps_the_executed_graph(stages):
    assert stages["plan"].graph is stages["insert-reshard"]   # executed above


# -- pipelines --------------------------------------------------------------------------
def test_pipeline_spec_parses_and_rejects_unknowns(program):
    passes = parse_pipeline("assign-devices{policy=split}, choose-overlap,insert-reshard")
    assert [p.name for p in passes] == list(PASSES)
    assert passes[0] == AssignDevices("split")
    with pytest.raises(gr.UsageError, match="unknown pass 'fuse'"):
        parse_pipeline("assign-devices,fuse")
    with pytest.raises(gr.UsageError, match="assign-devices has no option 'mode'"):
        parse_pipeline("assign-devices{mode=fast}")
    with pytest.raises(gr.UsageError, match="unknown policy 'fastest'"):
        compile_graph(program.graph, CLUSTER, "fastest")


@pytest.mark.parametrize("spec, message", [
    ("insert-reshard{exact=maybe}", r"insert-reshard: option exact='maybe' is not a bool"),
    ("staleness{k=one}", r"staleness: option k='one' is not a int"),
    ("staleness{k=-1}", r"staleness: k must be an integer >= 0"),
    ("staleness{k=1,k=2}", r"staleness: option k given twice"),
    ("staleness{k}", r"staleness: option k needs a value"),
    ("assign-devices{policy=fastest}", r"assign-devices: unknown policy 'fastest'"),
    ("lower{policy=auto}", r"pass lower has no option 'policy' \(its options: none\)"),
    ("lower,choose-overlap", r"lower makes the plan: it must be the pipeline's last pass"),
    ("", r"empty pass pipeline"),
])
def test_pass_options_are_typed_and_checked(spec, message):
    with pytest.raises(gr.UsageError, match=message):
        parse_pipeline(spec)


def test_pass_options_are_coerced_by_their_declared_types_and_print_back():
    passes = parse_pipeline("staleness{k=2},assign-devices{policy=split},choose-overlap,"
                            "insert-reshard{exact=false},lower")
    assert passes[0].k == 2 and passes[3].exact is False   # not the truthy string "false"
    text = pipeline_text(passes)
    assert text == ("staleness{k=2},assign-devices{policy=split},choose-overlap,"
                    "insert-reshard{exact=false},lower")
    assert parse_pipeline(text) == passes
    assert set(PASSES_BY_NAME) == {"staleness", "assign-devices", "choose-overlap",
                                   "insert-reshard", "price-stream", "lower"}


def test_the_ranking_runs_the_declared_rest_of_the_pipeline(program):
    """auto ranks its finalists by the plans the passes after it make (ctx.rest), in a
    scratch context; the declared options take effect."""
    from graphrl.passes.lower import Lower
    from graphrl.passes.policies import auto_finalists
    from graphrl.passes.assign_devices import problem_from_graph

    graph = program.graph
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Spy:
        name: str = "spy"

        def run(self, g, ctx):
            seen.append((ctx.ranking, ctx.check, g.schedule is not None))
            return g

    ctx = PassContext(CLUSTER)
    ctx.rest = (Spy(), ChooseOverlap(), InsertReshard(), Lower())
    AssignDevices("auto").run(graph, ctx)
    finalists = auto_finalists(problem_from_graph(graph, PassContext(CLUSTER)))
    assert len(finalists) > 1 and seen == [(True, False, True)] * len(finalists)
    exact = compile_graph(graph, CLUSTER, pipeline="assign-devices,choose-overlap,"
                          "insert-reshard{exact=true},lower")
    closed = compile_graph(graph, CLUSTER, pipeline="assign-devices,choose-overlap,"
                           "insert-reshard{exact=false},lower")
    assert exact.pipeline.endswith("insert-reshard{exact=true},lower")
    assert closed.pipeline.endswith("insert-reshard{exact=false},lower")
    for c in (exact, closed):
        assert simulate(c.plan)[1] == c.plan.predicted_step_seconds
    with pytest.raises(gr.UsageError, match="does not end with lower"):
        compile_graph(graph, CLUSTER, pipeline="assign-devices,choose-overlap")


# -- HybridFlow §5.4 reference case -----------------------------------------------------
def test_hybridflow_zero_redundancy_reshard_of_llama2_7b():
    """Train tp=4 x dp=2 -> generate tp=2 (micro-dp 2) on the same 8 GPUs, generation ranks
    ordered by generation_placement: every GPU receives at most (d_g - 1)/(t*p) * M,
    d_g = t*p/(t_g*p_g) = 2, i.e. M/4 -- far below DeepSpeed-Chat's (t*p*d - 1)/(t*p*d) * M
    and below consecutive grouping's (t*p - 1)/(t*p) * M."""
    spec = gr.llama2("7b")
    M = spec.weight_bytes
    t, p, d, t_g, p_g = 4, 1, 2, 2, 1
    train = Placement(DeviceMesh.range(0, 8), Strategy(dp=d, tp=t))
    gen = generation_placement(train, Placement(DeviceMesh.range(0, 8), Strategy(dp=4, tp=t_g)))
    # HybridFlow's groups (1-based in the paper): TP [G1,G3],[G2,G4],[G5,G7],[G6,G8]
    assert [gen.mesh.gpus[i:i + 2] for i in range(0, 8, 2)] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    traffic = plan_traffic(spec, train, gen)
    d_g = t * p // (t_g * p_g)
    bound = (d_g - 1) / (t * p) * M
    received = dict(traffic.received)
    assert set(received) == set(range(8))
    assert all(0 < b <= bound for b in received.values()), received
    assert traffic.max_link_bytes <= bound
    assert bound == M / 4
    deepspeed_chat = (t * p * d - 1) / (t * p * d) * M
    consecutive = (t * p - 1) / (t * p) * M
    assert traffic.max_link_bytes < consecutive / 2 < deepspeed_chat / 2
    # without the reordering some GPU's generation shard misses its own training shard
    plain = plan_traffic(spec, train, Placement(DeviceMesh.range(0, 8), Strategy(dp=4, tp=2)))
    assert plain.max_link_bytes > bound


def test_verify_plan_counts_a_generation_copy_beside_its_training_state():
    """The policy's generation copy on part of its training GPUs is a unit of its own:
    verify_plan adds its bytes to the training state's (it once kept the larger of the
    two, keyed by model) and rejects a plan whose sum does not fit."""
    plan, ev = lower_assignment("7b", "1x8xH100", {
        "policy.generate": "0-3", "policy": "0-7", "reference": "0-7", "reward": "4-7",
        "critic": "4-7"}, stream=1)
    on_gpu0 = {unit: nbytes for gpu, unit, nbytes in plan.resident if gpu == 0}
    assert set(on_gpu0) == {"policy", "policy.generate", "reference"}
    cap = plan.cluster.gpu.memory_bytes
    # each copy alone leaves room for reference.forward on GPU 0; both together do not
    ref_mem = max(i.mem for i in plan.stream(0).instrs if i.label == "reference.forward")
    each = (cap - ref_mem) * 3 // 4
    tight = dataclasses.replace(plan, resident=tuple(
        (g, u, each if g == 0 and u.startswith("policy") else b) for g, u, b in plan.resident))
    with pytest.raises(GraphError, match=r"GPU 0 .*of other resident models"):
        verify_plan(tight)
