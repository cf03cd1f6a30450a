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
    # fp32: streamed and one-pass results are compared exactly
    exp = load_build("grpo")(gr.RunOptions(batch_size=2, response_len=10, precision="fp32"))
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
    _, early = _run(grpo, 1, 3, ahead=True)
    monkeypatch.setattr(sg, "DEFAULT_SLOTS", 3)
    _, late = _run(grpo, 1, 3, ahead=False)
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


def test_stream_pricing_reduces_to_the_serving_model_and_overlaps_the_tail():
    """With the cut at the response budget there is no tail: the head is the serving
    model's whole-batch price; an earlier cut lets the next batch fill the tail, so a
    step costs less than the whole batch when training is short."""
    from graphrl.async_cost import _gen_call, streamed_generation
    from graphrl.cluster import ClusterSpec
    from graphrl.lengths import parse as parse_lengths
    from graphrl.passes.assign_devices import problem_from_graph
    from graphrl.passes.base import PassContext
    from graphrl.stream_cost import best_stream, stream_phases

    graph = load_build("grpo")(gr.RunOptions(model_size="7b-64k", prompt_len=1024,
                                             response_len=16384, batch_size=64)
                               ).program().graph
    problem = problem_from_graph(graph, PassContext(
        ClusterSpec.parse("2x8xH100"), gen_engine="graph",
        lengths=parse_lengths("lognormal:mean=3072,max=16384")))
    gen = _gen_call(problem)
    ideal, strategy = streamed_generation(problem, gen, 8, 1)
    whole = problem.cost(gen, strategy).seconds
    flat = stream_phases(problem, gen, strategy, gen.new_tokens)
    assert flat.tail == 0 and flat.head == pytest.approx(whole, rel=0.01)
    choice = best_stream(problem, gen, strategy, train=0.1 * whole, push=0.0)
    assert choice.cut < gen.new_tokens
    assert ideal * 0.99 <= choice.phases.total and choice.step_seconds < 0.8 * whole


def _one_pass():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from plan_quality_async import one_pass
    return one_pass


def _whiten(g):
    n = g.node("%advantages")
    return g.replace_node(n.name, dataclasses.replace(n, attrs=tuple(sorted(
        dict(n.attrs, whiten=True).items()))))


def _unmarked(program):
    g = program.graph
    for n in g.nodes:
        if n.attr("head_part"):
            g = g.replace_node(n.name, dataclasses.replace(
                n, attrs=tuple(a for a in n.attrs if a[0] != "head_part")))
    return dataclasses.replace(program, graph=g)


def test_streamed_scoring_splits_forwards_exactly_and_names_what_waits(grpo):
    """The forwards of a step start on the previous batch's head-finished groups (those
    whose responses all stopped within stream_cut; stop tokens make lengths vary) and
    the rest: the step's results equal the unsplit run's. Trains wait, and say why."""
    from graphrl.backends.stream_parts import head_mask
    from graphrl.stream_train import split_report

    program = grpo.program(1)
    n = program.graph.node("%rollout")
    n = dataclasses.replace(n, attrs=tuple(sorted(n.attrs + (("stop_token_ids",
                                                                (2, 3, 4)),))))
    program = dataclasses.replace(program, graph=program.graph.replace_node(n.name, n))
    report = split_report(program.graph, 1)
    assert report.calls == ("%policy_logprobs", "%reference_logprobs", "%rm_score")
    assert report.refused == (("%policy@1", "epochs=2 x minibatches=2: more than one "
                               "optimizer pass, whose first update needs rows of both parts"),)
    split, whole = (_run(grpo, 1, 3, ahead=True, program=p)[1] for p in
                    (program, _unmarked(program)))
    ex, _ = _run(grpo, 1, 2, ahead=True, program=program)
    mask = head_mask(ex.carried["%rollout_prev"], n.attr("stream_cut"), 4)
    assert mask.any() and not mask.all()      # both parts hold groups
    for a, b in zip(split[1:], whole[1:], strict=True):
        for name in a.outputs:
            for f, t in a.outputs[name].items():
                assert torch.allclose(t.float(), b.outputs[name][f].float(),
                                      rtol=1e-6, atol=1e-7), (name, f)
    # one optimizer pass, gae with or without whitening: the reasons differ
    ppo = load_build("ppo")(gr.RunOptions(batch_size=2, response_len=6)).program(1).graph
    why = dict(split_report(ppo, 1).refused)
    assert "%critic_values" in split_report(ppo, 1).calls and "epochs=2" in why["%policy@1"]
    assert carry_rollouts(grpo.program().graph, 2).node("%rm_score").attr("head_part") is None
    # one optimizer pass: the train and the group advantages feeding it start early too;
    # PPO's gae whitens its advantages over the batch unless told not to
    one_pass = _one_pass()

    g = carry_rollouts(one_pass(grpo.program().graph), 1)
    assert split_report(g, 1).calls[-2:] == ("%advantages", "%policy@1")
    ppo = load_build("ppo")(gr.RunOptions(batch_size=2, response_len=6)).program().graph
    whiten = dict(split_report(carry_rollouts(_whiten(one_pass(ppo)), 1), 1).refused)
    assert "whiten=true" in whiten["%policy@1"]
    assert {"%policy@1", "%critic@1"} <= set(split_report(carry_rollouts(one_pass(ppo), 1),
                                                          1).calls)


def test_streamed_scoring_price_never_above_and_equal_without_a_head_part():
    """StreamPhases.step_split: max(H, rest) + push + max(T, early) is today's price when
    nothing finishes in the head (early 0, rest the whole step), and the compiler keeps
    the split only where it is shorter (async_compile.as_executed)."""
    from graphrl.stream_cost import StreamPhases

    ph = StreamPhases(head=3.0, tail=2.0)
    for train in (1.0, 4.0, 9.0):
        assert ph.step_split(0.0, train, 0.5) == ph.step(train, 0.5)
        for a in (0.25, 0.5, 0.9):
            early, rest = a * train, (1 - a) * train
            assert min(ph.step_split(early, rest, 0.5), ph.step(train, 0.5)) <= ph.step(train, 0.5)
    assert ph.step_split(6.0, 3.0, 0.5) < ph.step(9.0, 0.5)   # training-bound: pays


def test_train_in_two_parts_is_the_whole_batch_update(grpo):
    """train_loop.TwoParts: the head part's gradient, then the rest's weighted by their
    loss tokens and one optimizer step, is the unsplit train's update (a real tiny
    policy, GRPO loss, responses of varied lengths)."""
    import copy

    from graphrl import ops
    from graphrl.backends.stream_parts import head_mask, split_train

    program = grpo.program(1)
    n = program.graph.node("%rollout")
    n = dataclasses.replace(n, attrs=tuple(sorted(n.attrs + (("stop_token_ids", (2, 3, 4)),))))
    program = dataclasses.replace(program, graph=program.graph.replace_node(n.name, n))
    ex, _ = _run(grpo, 1, 2, ahead=True, program=program)
    rollout = ex.carried["%rollout_prev"]
    policy = ex.engines["policy"]
    inputs = {"rollout": rollout, "old_logprobs": policy.forward(rollout),
              "ref_logprobs": ex.engines["reference"].forward(rollout),
              "advantages": ops.group_advantages.fn(rollout, {"score": torch.linspace(
                  -1, 1, rollout["tokens"].shape[0])}, group_size=4)}
    mask = head_mask(rollout, n.attr("stream_cut"), 4)
    assert mask.any() and not mask.all()
    kw = dict(loss="grpo", seed=3, clip=0.2, kl_coef=0.01)
    whole, split = policy, copy.deepcopy(policy)
    before = whole.export_weights()
    stats_whole = whole.train(inputs, **kw)
    stats_split = split_train(split, inputs, mask, **kw)
    assert split.version == whole.version
    for k, v in stats_whole.items():
        assert stats_split[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    a, b = whole.export_weights(), split.export_weights()
    moved = max((a[k] - before[k]).abs().max().item() for k in a)
    assert moved > 5e-4      # a real update (lr 1e-3), equal up to summation order
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    with pytest.raises(gr.UsageError, match="without its head part"):
        split.train(inputs, part="rest", **kw)
