"""Streamed generation for asynchronous steps (backends/stream_generation.py): results
do not depend on scheduling (slots, whether the next batch starts early), every sample's
version is within the staleness bound, the next batch really starts in the tail, and the
behaviour log-probs are those of the weights that sampled each token."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import graphrl as gr
from conftest import load_build
from graphrl.backends import stream_generation as sg
from graphrl.backends.local import LocalExecutor
from graphrl.passes.staleness import carry_rollouts


@pytest.fixture(scope="module")
def grpo():
    exp = load_build("grpo")(gr.RunOptions(batch_size=2, response_len=10))
    return dataclasses.replace(exp, prepare=None)


def _run(exp, k, steps, ahead, program=None):
    ex = LocalExecutor(program or exp.program(k), seed=5)
    out = []
    for i in range(steps):
        up = {"upcoming": exp.data(i + 1)} if ahead and i + 1 < steps else {}
        out.append(ex.run_step(exp.data(i), iteration=i, **up))
    return ex, out


def test_results_do_not_depend_on_scheduling(grpo, monkeypatch):
    """Starting the next batch in the tail, and few slots, change timing only."""
    _, early = _run(grpo, 1, 4, ahead=True)
    monkeypatch.setattr(sg, "DEFAULT_SLOTS", 3)
    _, late = _run(grpo, 1, 4, ahead=False)
    for a, b in zip(early[1:], late[1:], strict=True):
        assert set(a.outputs) == set(b.outputs)
        for name in a.outputs:
            for f, t in a.outputs[name].items():
                assert torch.allclose(t.float(), b.outputs[name][f].float(),
                                      rtol=1e-5, atol=1e-6), (name, f)


@pytest.mark.parametrize("k", [1, 2])
def test_versions_within_the_bound_and_next_batch_starts_in_the_tail(grpo, k):
    ex, out = _run(grpo, k, k + 3, ahead=True)
    engine = ex.engines["policy"]
    stream = sg.streams_of(ex)[("policy", "%rollout")]
    assert set(stream.batches) == set()      # the last step had no next batch
    for i, r in enumerate(out[k:], start=k):
        versions = r.outputs[f"rollout_version_prev{'' if k == 1 else k}"]["version"]
        trainer = i - k                        # trains before step i (after warm-up)
        assert 0 <= trainer - int(versions.max()) and trainer - int(versions.min()) <= k
    assert engine.version == 3
    # mid-run, the tail of step 1 admitted batch 2 and sampled some of its tokens
    ex, _ = _run(grpo, k, 2, ahead=False)
    ex.run_step(grpo.data(2), iteration=2, upcoming=grpo.data(3))
    stream = sg.streams_of(ex)[("policy", "%rollout")]
    nxt = stream.batches[3]
    assert nxt.version == ex.engines["policy"].version and any(nxt.tokens)
    assert all(len(t) <= stream.cut for t in nxt.tokens)


def test_behaviour_logprobs_switch_weights_at_the_cut(grpo):
    """Tokens before the cut are scored by the step's weights, the rest by the next."""
    program = grpo.program(1)
    ex = LocalExecutor(program, seed=5)
    for i in range(2):
        ex.run_step(grpo.data(i), iteration=i)
    engine = ex.engines["policy"]
    before = engine.export_weights()
    ex.run_step(grpo.data(2), iteration=2)    # generates batch 2: head v1, tail v2
    after = engine.export_weights()
    assert engine.version == 2
    rollout, behaviour = ex.carried["%rollout_prev"], ex.carried["%rollout_behaviour_prev"]
    cut = program.graph.node("%rollout").attr("stream_cut")
    plen = grpo.inputs["prompts"].seq
    scores = {}
    for name, w in (("old", before), ("new", after)):
        engine.load_weights(w)
        scores[name] = engine.forward(rollout)["logprobs"]
    lp = behaviour["logprobs"]
    mask = rollout["response_mask"].bool()
    head = mask.clone()
    head[:, plen + cut:] = False
    tail = mask & ~head
    assert head.any() and tail.any()
    assert torch.allclose(lp[head], scores["old"][head], atol=1e-5)
    assert torch.allclose(lp[tail], scores["new"][tail], atol=1e-5)
    assert not torch.allclose(scores["old"][tail], scores["new"][tail], atol=1e-5)


def test_stream_off_is_the_batch_queue(grpo):
    g = carry_rollouts(grpo.program().graph, 1, stream=False)
    assert g.node("%rollout").attr("stream_cut") is None
    assert grpo.program(1).graph.node("%rollout").attr("stream_cut") == 5
