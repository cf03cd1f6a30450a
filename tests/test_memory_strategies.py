"""Memory that holds: headroom, activation recompute and optimizer offload as strategies,
and the host-RAM check of what a plan offloads."""
from __future__ import annotations

import pytest

import graphrl as gr
from conftest import load_build
from graphrl import cost
from graphrl.cluster import A100_80G, ClusterSpec
from graphrl.compiler import compile_graph
from graphrl.parallel import Strategy
from graphrl.passes.search import DEFAULT_HEADROOM
from graphrl.types import llama2

S7 = llama2("7b")


def test_recompute_and_offload_trade_time_for_memory():
    base = Strategy(dp=4, zero=1)
    rc = Strategy(dp=4, zero=1, recompute=1)
    off = Strategy(dp=4, zero=1, recompute=1, offload=1)
    m = [cost.train_memory(S7, 32, 2048, s) for s in (base, rc, off)]
    t = [cost.train_time(S7, 32, 2048, s, A100_80G) for s in (base, rc, off)]
    assert m[0] > m[1] > m[2] and t[0] < t[1] < t[2]
    assert cost.host_state_bytes(S7, base) == 0
    assert cost.host_state_bytes(S7, off) == pytest.approx(12 * S7.num_params / 4)
    assert cost.model_state_bytes(S7, off) == pytest.approx(4 * S7.num_params)
    assert Strategy.parse(off.text()) == off and "recompute=1,offload=1" in off.text()


def _graph(example, size, batch=64):
    opts = gr.RunOptions(model_size=size, prompt_len=256, response_len=256, batch_size=batch)
    return load_build(example)(opts).program().graph


def test_headroom_is_kept_and_offload_makes_70b_fit_16_a100():
    c = compile_graph(_graph("ppo", "70b"), ClusterSpec.parse("2x8xA100"), "auto",
                      gen_engine="graph")
    ev = c.evaluation
    room = A100_80G.memory_bytes * (1 - DEFAULT_HEADROOM)
    assert all(s.choice.peak_bytes <= room for s in ev.schedule if s.choice)
    train = next(s for s in ev.schedule if s.choice and s.name.endswith("policy@1"))
    assert train.choice.strategy.offload or train.choice.strategy.recompute
    with pytest.raises(gr.UsageError, match="memory headroom"):
        compile_graph(_graph("grpo", "7b"), ClusterSpec.parse("1x8xA100"), "auto",
                      memory_headroom=1.5)


def test_host_ram_overflow_is_a_clear_error():
    with pytest.raises(gr.UsageError, match=r"node 0's host RAM: offloaded state needs "
                                            r"[\d.]+ GiB, a node has [\d.]+ GiB"):
        compile_graph(_graph("ppo", "70b"), ClusterSpec.parse("1x8xA100"), "auto",
                      gen_engine="graph")
