"""Every call is planned with the strategy its engine executes (no Ray here):

- a model's forward calls run on its training engine, so the compiler plans them with
  the train call's strategy (graphrl.engines.shared_strategy); a forward pinned to other
  degrees is refused before launch, naming the call, the strategy and the engines able;
- the placement search chooses the engine of a model nobody pinned (megatron for tp/pp,
  deepspeed for what only ZeRO-1/2, micro-batches or optimizer offload need) and shows
  it in the plan; the plans it used to accept it still accepts;
- the Ray report marks a call whose executed degrees differ from its plan.
"""
from __future__ import annotations

import pytest

import graphrl as gr
from conftest import load_build
from graphrl.backends.ray.report import call_engines, engine_lines
from graphrl.cluster import ClusterSpec
from graphrl.compiler import compile_graph
from graphrl.engines import (can_run, degree_mismatches, degrees_text, parse_degrees,
                             planned_degrees, resolve_engines, shared_strategy)
from graphrl.parallel import Strategy

CPU4 = ClusterSpec.parse("1x4xcpu")


@pytest.fixture(scope="module")
def ppo():
    return load_build("ppo")(gr.RunOptions(batch_size=8)).program().graph


def placed(compiled):
    return {n.call: n.placement.strategy for n in compiled.graph.nodes
            if n.kind == "call" and n.placement is not None}


def test_forward_planned_with_its_training_engines_strategy(ppo):
    pins = {"policy.train": {"gpus": "0-3", "tp": 2, "pp": 2, "engine": "megatron"},
            "critic.train": {"gpus": "0-3", "dp": 4, "zero": 2, "engine": "deepspeed"}}
    s = placed(compile_graph(ppo, CPU4, "auto", placement=pins, engines=True))
    assert s["policy.forward"] == Strategy(1, 2, 2, 2, 0, engine="megatron")
    assert s["policy.train"] == Strategy(1, 2, 2, 2, 0, engine="megatron")
    # ZeRO-1/2 shard nothing a forward holds: the forward is plain data parallel
    assert s["critic.forward"] == Strategy(dp=4, engine="deepspeed")
    assert s["critic.train"] == Strategy(dp=4, zero=2, engine="deepspeed")
    fsdp = placed(compile_graph(ppo, CPU4, "auto", engines=True, placement={
        "policy.train": {"gpus": "0-1", "dp": 2, "zero": 3}}))
    assert fsdp["policy.forward"] == Strategy(dp=2, zero=3)   # FSDP2 gathers per pass


def test_shared_strategy_rules():
    lead = Strategy(2, 2, 2, 4, 1, recompute=1, offload=1, engine="megatron")
    assert shared_strategy(lead, "train", 8) == lead
    assert shared_strategy(lead, "forward", 16) == Strategy(2, 2, 2, 4, 0, engine="megatron")
    assert shared_strategy(lead, "forward", 12).micro_batches == 1   # 6 rows: not by 4
    assert shared_strategy(Strategy(dp=4, micro_batches=2, zero=3), "forward", 8) == \
        Strategy(dp=4, zero=3)


def test_forward_pinned_apart_from_its_engine_is_refused_before_launch(ppo):
    pins = {"policy.train": {"gpus": "0-3", "tp": 2, "pp": 2, "engine": "megatron"},
            "policy.forward": {"dp": 4}}
    planning = compile_graph(ppo, CPU4, "auto", placement=pins)   # a plan to look at
    assert placed(planning)["policy.forward"].dp == 4
    with pytest.raises(gr.UsageError) as e:
        compile_graph(ppo, CPU4, "auto", placement=pins, engines=True)
    msg = str(e.value)
    assert "call policy.forward" in msg and "dp=4,tp=1,pp=1" in msg
    assert "megatron" in msg and "policy.train" in msg and "dp=1,tp=2,pp=2,mb=2" in msg
    assert "Engines that can run dp=4,tp=1,pp=1: hf, megatron, deepspeed" in msg
    with pytest.raises(gr.UsageError, match="call policy.forward"):
        resolve_engines(planning.graph)   # what the Ray backend checks before it starts


def test_search_picks_megatron_for_what_only_megatron_runs(ppo):
    s = placed(compile_graph(ppo, CPU4, "auto", engines=True,
                             placement={"policy.train": {"gpus": "0-3", "tp": 2, "pp": 2}}))
    assert s["policy.train"].engine == "megatron" and s["policy.forward"].engine == "megatron"
    assert (s["policy.forward"].tp, s["policy.forward"].pp) == (2, 2)
    assert s["policy.generate"].engine == ""   # generation: its own hf engine
    text = compile_graph(ppo, CPU4, "auto", engines=True, placement={
        "critic.train": {"gpus": "2-3", "dp": 2, "zero": 1}}).graph.text()
    assert "zero=1,engine=deepspeed" in text   # hf does not shard optimizer state alone


def test_search_picks_megatron_where_only_tensor_parallelism_fits():
    g = load_build("ppo")(gr.RunOptions(model_size="70b", prompt_len=256, response_len=256,
                                        batch_size=64)).program().graph
    # a planning-size plan (no engine here generates with tp > 1: it is not run)
    c = compile_graph(g, ClusterSpec.parse("4x8xH100"), "colocate-all", gen_engine="graph")
    s = placed(c)
    assert s["policy.train"].tp * s["policy.train"].pp > 1
    assert s["policy.train"].engine == "megatron"
    assert s["policy.forward"] == shared_strategy(s["policy.train"], "forward", 64)
    for n in c.graph.nodes:   # every forward/train call: an engine that executes it
        if n.kind == "call" and n.target != "generate":
            assert can_run(n.placement.strategy.engine or "hf", n.target,
                           n.placement.strategy), (n.call, n.placement.strategy.text())


def test_hf_is_not_given_what_it_does_not_execute():
    assert can_run("hf", "train", Strategy(dp=4, zero=3))
    assert not can_run("hf", "train", Strategy(dp=4, zero=3, micro_batches=2))
    assert not can_run("hf", "train", Strategy(dp=4, zero=3, offload=1))
    assert can_run("deepspeed", "train", Strategy(dp=4, zero=2, micro_batches=2, offload=1))
    assert not can_run("megatron", "train", Strategy(tp=2, offload=1))


def test_pinned_engine_keeps_its_refusal(ppo):
    with pytest.raises(gr.UsageError) as e:
        compile_graph(ppo, CPU4, "auto", engines=True, placement={
            "policy.train": {"gpus": "0-3", "tp": 2, "engine": "deepspeed"}})
    assert "call policy.train" in str(e.value) and "engines that can: megatron" in str(e.value)


def test_degrees_round_trip_and_mismatch_report():
    ran = {"engine": "megatron", "dp": 1, "tp": 2, "pp": 2, "sp": True, "zero": 0,
           "micro_batches": 2, "precision": "bf16"}
    assert parse_degrees(degrees_text(ran)) == ran
    plan = planned_degrees("megatron", "forward", Strategy(1, 2, 2, 2, engine="megatron"),
                           precision="bf16")
    assert degree_mismatches("forward", plan, ran) == []
    dp4 = planned_degrees("hf", "forward", Strategy(dp=4), precision="fp32")
    assert degree_mismatches("forward", dp4, ran) == [
        "engine hf->megatron", "dp 4->1", "tp 1->2", "pp 1->2", "sp False->True",
        "micro_batches 1->2", "precision fp32->bf16"]
    # an engine that does not say its precision disagrees with any plan
    unsaid = {k: v for k, v in ran.items() if k != "precision"}
    assert degree_mismatches("forward", plan, unsaid) == ["precision bf16->None"]
    # ZeRO-1/2 engines run a forward as ZeRO 0; fast is hf outside generation
    assert degree_mismatches("forward", planned_degrees("hf", "forward", Strategy(dp=2),
                                                        precision="bf16"),
                             {"engine": "fast", "dp": 2, "tp": 1, "pp": 1, "sp": False,
                              "zero": 2, "micro_batches": 1, "precision": "bf16"}) == []


def test_report_marks_a_call_that_ran_other_degrees(ppo):
    c = compile_graph(ppo, CPU4, "auto", engines=True, placement={
        "policy.train": {"gpus": "0-3", "tp": 2, "pp": 2, "engine": "megatron"}})
    node = next(n for n in c.graph.nodes if n.call == "policy.forward")
    resolved = resolve_engines(c.graph)
    wrong = "engine=hf dp=4 tp=1 pp=1 sp=False zero=0 micro_batches=1 precision=bf16"
    right = degrees_text(planned_degrees("megatron", "forward", node.placement.strategy,
                                         precision="bf16"))
    report = call_engines(c.graph, resolved, {node.name: (0, {wrong})})
    assert report["policy.forward"]["differs"][:2] == ["engine megatron->hf", "dp 1->4"]
    assert "NO: engine megatron->hf" in "\n".join(engine_lines(report))
    ok = call_engines(c.graph, resolved, {node.name: (2, {right})})
    assert ok["policy.forward"]["differs"] == []
    assert engine_lines(ok)[-1].endswith(" yes")
    split = call_engines(c.graph, resolved, {node.name: (2, {right, wrong})})
    assert any(d.startswith("ranks ran") for d in split["policy.forward"]["differs"])
    # a call that computed in another precision than its model's plan is reported
    fp32 = right.replace("precision=bf16", "precision=fp32")
    bad = call_engines(c.graph, resolved, {node.name: (2, {fp32})})
    assert bad["policy.forward"]["differs"] == ["precision bf16->fp32"]
    assert engine_lines(bad)[-1].endswith("NO: precision bf16->fp32")
