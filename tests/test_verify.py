"""verify_graph's invariants, one test per error kind, and the tracer's errors.

Every bad graph is the traced PPO step with one edit; each error must name the node and
its call, give the reason, and show the graph text around the offending line marked `>>`.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import pytest

import graphrl as gr
from graphrl import (DeviceMesh, Graph, GraphError, Placement, Strategy, TraceError, Value,
                     parse_graph, print_graph, verify_graph)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from common import gpt2_config, llama_config, reward_model  # noqa: E402


@functools.lru_cache(maxsize=None)
def ppo_graph() -> Graph:
    from ppo import build

    return build(gr.RunOptions(batch_size=4)).program().graph


def edit_text(old: str, new: str) -> Graph:
    """The PPO graph with one textual edit, parsed back (not verified)."""
    text = print_graph(ppo_graph())
    assert text.count(old) == 1, old
    return parse_graph(text.replace(old, new))


def edit_node(name: str, **changes) -> Graph:
    g = ppo_graph()
    return g.replace_node(name, dataclasses.replace(g.node(name), **changes))


def verify_fails(g: Graph, reason: str, *, marked: str, node: str = "", call: str = "") -> str:
    """verify_graph(g) raises a GraphError giving `reason`, naming `node` (`call`) and
    marking with `>>` the line that starts with `marked`, shown among its neighbours."""
    with pytest.raises(GraphError) as info:
        verify_graph(g)
    err = info.value
    msg = str(err)
    header = msg.splitlines()[0]
    assert header.startswith(f"graph @{g.name}: "), msg
    assert reason in header, msg
    if node:
        assert f"node {node} ({call}): " in header, msg
        assert err.node == node
    else:
        assert err.node == ""
    context = msg.splitlines()[1:]
    assert err.context == "\n".join(context)
    arrows = [ln for ln in context if ln.startswith(">> ")]
    assert len(arrows) == 1, msg
    assert arrows[0][3:].strip().startswith(marked), msg
    # context: the marked line among graph lines, each one a line of the printed graph
    printed = print_graph(g).splitlines()
    assert 2 <= len(context) <= 7, msg
    assert all(ln[3:] in printed for ln in context), msg
    at = context.index(arrows[0])
    assert at > 0 or at < len(context) - 1   # neighbours are shown
    return msg


# -- a valid graph -------------------------------------------------------------------------
def test_traced_ppo_graph_verifies_and_still_does_after_a_text_round_trip():
    g = ppo_graph()
    assert verify_graph(g) is g
    back = parse_graph(print_graph(g))
    assert verify_graph(back) == g
    assert verify_graph(parse_graph(print_graph(back))) == g


def test_placed_graph_verifies_after_a_text_round_trip():
    g = ppo_graph()
    placed = g.with_nodes(dataclasses.replace(n, placement=Placement(DeviceMesh.range(0, 4),
                                                                     Strategy(dp=2, tp=2)),
                                              group="fwd" if n.target == "forward" else "")
                          for n in g.nodes)
    verify_graph(placed)
    assert verify_graph(parse_graph(print_graph(placed))) == placed


# -- one test per error kind -------------------------------------------------------------
def test_dependency_cycle():
    # %rollout now consumes %task_score, which consumes %rollout
    g = edit_text("(%policy@0, %prompts) {max_new_tokens=8, samples=1, temperature=1.0} : "
                  "(Weights[policy], Prompts)",
                  "(%policy@0, %task_score) {max_new_tokens=8, samples=1, temperature=1.0} : "
                  "(Weights[policy], *)")
    msg = verify_fails(g, "dependency cycle", node="%rollout", call="policy.generate",
                       marked="%rollout = call generate[policy](%policy@0, %task_score)")
    assert "%rollout -> %task_score -> %rollout" in msg


def test_undefined_input():
    g = edit_text("forward[reward](%reward@0, %rollout)", "forward[reward](%reward@0, %rolout)")
    verify_fails(g, "undefined input %rolout", node="%rm_score", call="reward.forward",
                 marked="%rm_score = call forward[reward]")


def test_unknown_model_method():
    g = edit_node("%rm_score", target="generate")
    msg = verify_fails(g, "model 'reward' has no method 'generate'", node="%rm_score",
                       call="reward.generate", marked="%rm_score = call generate[reward]")
    assert "(its methods: forward)" in msg


def test_frozen_model_has_no_train():
    g = edit_text("call train[critic]", "call train[reference]")
    verify_fails(g, "model 'reference' has no method 'train'", node="%critic@1",
                 call="reference.train", marked="%critic@1, %critic_stats = call train[reference]")


def test_unknown_model():
    g = edit_node("%critic_values", model="critc")
    msg = verify_fails(g, "unknown model 'critc'", node="%critic_values", call="critc.forward",
                       marked="%critic_values = call forward[critc]")
    assert "(declared: policy, reference, reward, critic)" in msg


def test_payload_mismatch_kind():
    g = edit_text("forward[reward](%reward@0, %rollout)", "forward[reward](%reward@0, %prompts)")
    verify_fails(g, "payload mismatch: input %prompts is Prompts (Prompts[4, seq=6]"
                    "{tokens:i64[s], attention_mask:f32[s], row:i64}) but reward.forward "
                    "expects Rollout",
                 node="%rm_score", call="reward.forward", marked="%rm_score = call")


def test_payload_mismatch_weights_of_another_model():
    g = edit_text("forward[reward](%reward@0, %rollout)", "forward[reward](%policy@0, %rollout)")
    verify_fails(g, "payload mismatch: input %policy@0 is Weights[policy]", node="%rm_score",
                 call="reward.forward", marked="%rm_score = call")


def test_payload_batch_mismatch():
    n = ppo_graph().node("%policy_logprobs")
    wide = Value(n.name, n.outputs[0].spec.with_batch(8))
    g = edit_node("%policy_logprobs", outputs=(wide,))
    verify_fails(g, "payload mismatch: inputs disagree on batch size "
                    "(%rollout: 4, %policy_logprobs: 8, %advantages: 4)",
                 node="%policy@1", call="policy.train", marked="%policy@1, %policy_stats =")


def test_duplicate_value_name_points_at_the_redefinition():
    g = edit_text("%reference_logprobs = call", "%policy_logprobs = call")
    verify_fails(g, "duplicate value name %policy_logprobs", node="%policy_logprobs",
                 call="reference.forward",
                 marked="%policy_logprobs = call forward[reference]")


def test_duplicate_graph_input_name():
    g = ppo_graph()
    g = dataclasses.replace(g, inputs=g.inputs + (g.inputs[0],))
    verify_fails(g, "duplicate value name %prompts", marked="input %prompts")


def test_duplicate_model_name():
    g = ppo_graph()
    g = dataclasses.replace(g, models=g.models + (g.models[0],))
    verify_fails(g, "duplicate model name policy", marked="model policy")


def test_use_before_define():
    g = ppo_graph()
    nodes = list(g.nodes)
    nodes[0], nodes[1] = nodes[1], nodes[0]       # %policy_logprobs before %rollout
    verify_fails(g.with_nodes(nodes),
                 "uses %rollout before it is defined by %rollout (nodes must be listed in "
                 "topological order)", node="%policy_logprobs", call="policy.forward",
                 marked="%policy_logprobs = call forward[policy]")


def test_carry_target_not_an_input():
    g = edit_text("carry %critic@0 <- %critic@1", "carry %critic_values <- %critic@1")
    verify_fails(g, "carry target %critic_values is not a graph input",
                 marked="carry %critic_values <- %critic@1")


def test_carry_source_undefined():
    g = edit_text("carry %policy@0 <- %policy@1", "carry %policy@0 <- %policy@2")
    verify_fails(g, "carry source %policy@2 is not defined",
                 marked="carry %policy@0 <- %policy@2")


def test_carry_kind_mismatch():
    g = edit_text("carry %critic@0 <- %critic@1", "carry %critic@0 <- %policy@1")
    verify_fails(g, "carry %critic@0 <- %policy@1: Weights[policy] cannot feed Weights[critic]",
                 marked="carry %critic@0 <- %policy@1")


def test_output_undefined():
    g = edit_text("output %task_score,", "output %task_scor,")
    verify_fails(g, "output %task_scor is not defined", marked="output %task_scor, %rm_score")


def _late_reader(name: str, position: int | None = None) -> Graph:
    """A policy.forward on %policy@0 that the policy's train does not depend on."""
    g = ppo_graph()
    reader = g.node("%policy_logprobs")
    late = dataclasses.replace(reader, outputs=(Value(name, reader.outputs[0].spec),))
    nodes = list(g.nodes)
    nodes.insert(len(nodes) if position is None else position, late)
    return g.with_nodes(nodes)


def test_train_overwrites_weights_still_read_after_it():
    verify_fails(_late_reader("%late_logprobs"),
                 "train overwrites %policy@0 while %late_logprobs (policy.forward) still "
                 "reads it and is not ordered before the train", node="%policy@1",
                 call="policy.train", marked="%policy@1, %policy_stats = call train[policy]")


def test_train_overwrite_rule_is_about_dependencies_not_listing_order():
    # listed before the train, but nothing orders it before: it may run concurrently
    g = _late_reader("%side_logprobs", position=2)
    assert [n.name for n in g.nodes].index("%side_logprobs") < \
        [n.name for n in g.nodes].index("%policy@1")
    verify_fails(g, "while %side_logprobs (policy.forward) still reads it", node="%policy@1",
                 call="policy.train", marked="%policy@1, %policy_stats =")


def test_node_without_outputs():
    g = edit_node("%task_score", outputs=())
    g = dataclasses.replace(g, outputs=tuple(o for o in g.outputs if o != "%task_score"))
    verify_fails(g, "a node needs at least one output", node="<no outputs>", call="task_score",
                 marked="= op task_score(%rollout)")


def test_unknown_node_kind():
    g = edit_text("= op task_score(", "= opp task_score(")
    verify_fails(g, "unknown node kind 'opp' (known: call, op, system)", node="%task_score",
                 call="task_score", marked="%task_score = opp task_score")


def test_call_without_model():
    g = edit_text("= op task_score(", "= call task_score(")
    verify_fails(g, "a call needs a model", node="%task_score", call=".task_score",
                 marked="%task_score = call task_score")


def test_signature_arity_mismatch():
    g = edit_text("op task_score(%rollout) : (Rollout)", "op task_score(%rollout) : (Rollout, *)")
    verify_fails(g, "signature lists 2 inputs but the node has 1", node="%task_score",
                 call="task_score", marked="%task_score = op task_score")


# -- tracing errors ------------------------------------------------------------------------
def models() -> list[gr.Model]:
    return [gr.Model("policy", llama_config(), role="policy", trainable=True),
            gr.Model("reference", llama_config(), role="reference"),
            reward_model(gr.RunOptions()),
            gr.Model("critic", gpt2_config(), role="critic", head="value", trainable=True)]


def trace_fails(step, *fragments: str) -> str:
    with pytest.raises(TraceError) as info:
        gr.trace(step, models(), prompts=gr.prompts_spec(4, 6))
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_trace_undeclared_method_on_a_score_model():
    def step(prompts, reward):
        return {"rollout": reward.generate(prompts, max_new_tokens=4)}

    trace_fails(step, "reward.generate: model 'reward'", "head score, frozen",
                "has no method 'generate'", "its methods are forward")


def test_trace_undeclared_method_on_a_critic():
    def step(prompts, critic):
        return {"rollout": critic.generate(prompts, max_new_tokens=4)}

    trace_fails(step, "critic.generate: model 'critic'", "head value, trainable",
                "has no method 'generate'", "its methods are forward, train")


def test_trace_train_on_a_frozen_model():
    def step(prompts, policy, reference):
        rollout = policy.generate(prompts, max_new_tokens=4)
        return {"stats": reference.train(loss="ppo", rollout=rollout)}

    trace_fails(step, "reference.train: model 'reference'", "frozen", "has no method 'train'")


def test_trace_wrong_payload():
    def step(prompts, reward):
        return {"score": reward.forward(prompts)}

    trace_fails(step, "reward.forward: payload mismatch: %prompts is Prompts but "
                      "reward.forward takes Rollout")


def test_trace_untraced_argument():
    def step(prompts, policy):
        return {"lp": policy.forward("some text")}

    trace_fails(step, "policy.forward: expected a traced Rollout payload, got str 'some text'")


def test_trace_train_unknown_loss():
    def step(prompts, policy):
        rollout = policy.generate(prompts, max_new_tokens=4)
        return {"stats": policy.train(loss="dpo", rollout=rollout)}

    trace_fails(step, "policy.train: unknown loss 'dpo' (known: ppo, grpo, value")


def test_trace_train_missing_argument():
    def step(prompts, policy):
        rollout = policy.generate(prompts, max_new_tokens=4)
        return {"stats": policy.train(loss="ppo", rollout=rollout,
                                      old_logprobs=policy.forward(rollout))}

    trace_fails(step, "policy.train: loss 'ppo' needs argument(s) advantages",
                "advantages: Advantages")


def test_trace_train_argument_of_the_wrong_kind():
    def step(prompts, policy, critic):
        rollout = policy.generate(prompts, max_new_tokens=4)
        values = critic.forward(rollout)
        return {"stats": policy.train(loss="ppo", rollout=rollout,
                                      old_logprobs=policy.forward(rollout), advantages=values)}

    trace_fails(step, "policy.train argument advantages: payload mismatch: %critic_values is "
                      "Values")


def test_trace_generate_past_the_context():
    def step(prompts, policy):
        return {"rollout": policy.generate(prompts, max_new_tokens=70)}

    trace_fails(step, "policy.generate: prompt 6 + 70 new tokens = 76 exceeds the model's "
                      "context of 64")


def test_trace_parameter_neither_model_nor_input():
    def bad_step(prompts, policy, tokenizer):
        return {}

    trace_fails(bad_step, "step bad_step: parameter 'tokenizer' is neither a model "
                          "(policy, reference, reward, critic) nor a given input (prompts)")


def test_trace_step_returning_a_non_dict():
    def step(prompts, policy):
        return policy.generate(prompts, max_new_tokens=4)

    trace_fails(step, "step step must return a dict of traced payloads")


def test_trace_step_returning_a_dict_of_non_payloads():
    def step(prompts, policy):
        policy.generate(prompts, max_new_tokens=4)
        return {"reward": 1.0}

    trace_fails(step, "must return a dict of traced payloads")


def test_trace_branching_on_a_payload():
    def step(prompts, policy):
        rollout = policy.generate(prompts, max_new_tokens=4)
        return {"rollout": rollout} if rollout else {}

    trace_fails(step, "%rollout is a traced payload: a step cannot branch on its contents")
