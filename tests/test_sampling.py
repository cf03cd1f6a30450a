"""DAPO's sampling ops (graphrl/sampling.py) against the paper (Yu et al. 2025) on small
hand-made tensors; their trace-time checks; the variable batch they make; text DAPO."""
from __future__ import annotations

import pytest

import graphrl as gr
from graphrl import ops
from graphrl.sampling import variable_values

torch = pytest.importorskip("torch")


def rollout(lengths, seq=8, prompt=2):
    b = len(lengths)
    mask = torch.zeros(b, seq)
    for i, n in enumerate(lengths):
        mask[i, prompt:prompt + n] = 1.0
    tokens = torch.arange(b * seq).view(b, seq) % 5 + 3
    return {"tokens": tokens, "attention_mask": mask.clone().index_fill_(1, torch.arange(
        prompt), 1.0), "response_mask": mask, "row": torch.arange(b)}


def test_dynamic_sampling_keeps_varied_groups_up_to_the_plan():
    r = rollout([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6])
    # groups of 3: [1,1,1] equal, [0,1,0] varied, [0,0,0] equal, [1,0,1] varied
    s = {"score": torch.tensor([1., 1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1])}
    kept, ks = ops.dynamic_sampling.fn(r, s, group_size=3, keep_fraction=1.0)
    assert kept["row"].tolist() == [3, 4, 5, 9, 10, 11]
    assert ks["score"].tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.equal(kept["response_mask"], r["response_mask"][[3, 4, 5, 9, 10, 11]])
    # the plan keeps round(4 * 0.25) = 1 group: the first varied one
    kept, _ = ops.dynamic_sampling.fn(r, s, group_size=3, keep_fraction=0.25)
    assert kept["row"].tolist() == [3, 4, 5]
    # none varied: the first group (zero advantages) keeps the step going
    kept, ks = ops.dynamic_sampling.fn(r, {"score": torch.ones(12)}, group_size=3,
                                       keep_fraction=0.5)
    assert kept["row"].tolist() == [0, 1, 2]


def test_overlong_penalty_is_dapo_eq_13():
    """L_max = 6, L_cache = 2: lengths <= 4 get 0, 5 gets (4 - 5)/2, 6 gets (4 - 6)/2."""
    r = rollout([1, 4, 5, 6])
    out = ops.overlong_penalty.fn(r, {"score": torch.tensor([1., 1, 1, 0])}, max_len=6,
                                  cache=2)
    assert out["score"].tolist() == pytest.approx([1.0, 1.0, 0.5, -1.0])
    out = ops.overlong_penalty.fn(r, {"score": torch.zeros(4)}, max_len=4, cache=2,
                                  coef=0.5)   # 4: (2 - 4)/2 = -1; 5, 6 > L_max: -1; halved
    assert out["score"].tolist() == pytest.approx([0.0, -0.5, -0.5, -0.5])
    out = ops.overlong_penalty.fn(r, {"score": torch.zeros(4)}, max_len=6, cache=4)
    assert out["score"].tolist() == pytest.approx([0.0, -0.5, -0.75, -1.0])   # 2 - n / 4


def test_mask_truncated():
    r = rollout([2, 4, 4, 3])
    eos = 1                                         # other tokens are 3..7
    r["tokens"][2, 5] = eos                         # row 2 ends in EOS at the limit
    out = ops.mask_truncated.fn(r, max_new_tokens=4, eos_id=eos)
    assert out["response_mask"].sum(dim=1).tolist() == [2, 0, 4, 3]
    out = ops.mask_truncated.fn(r, max_new_tokens=4)   # no EOS id: all full-length rows
    assert out["response_mask"].sum(dim=1).tolist() == [2, 0, 0, 3]
    assert torch.equal(out["tokens"], r["tokens"])


def dapo_trace(body, batch=8):
    from common import llama_config

    def step(prompts, policy):
        r = policy.generate(prompts, max_new_tokens=4, samples=4)
        s = ops.op("score", (gr.signatures.ROLLOUT,), (("score", gr.signatures.SCORES, (
            gr.Field("score", "f32", per_token=False),)),))(lambda x: {})(r)
        return body(r, s, policy)
    return gr.trace(step, [gr.Model("policy", llama_config(), role="policy",
                                    trainable=True)], prompts=gr.prompts_spec(batch, 4))


def test_the_kept_batch_is_planned_and_variable_downstream():
    def body(r, s, policy):
        kept, ks = ops.dynamic_sampling(r, s, group_size=4, keep_fraction=0.5)
        lp = policy.forward(kept)
        adv = ops.group_advantages(kept, ks, group_size=4)
        return {"stats": policy.train(loss="ppo", rollout=kept, old_logprobs=lp,
                                      advantages=adv), "all": s}
    g = dapo_trace(body).graph
    batches = {n.target: n.outputs[0].spec.batch for n in g.nodes}
    assert batches["generate"] == 32 and batches["dynamic_sampling"] == 16
    assert batches["forward"] == 16 and batches["group_advantages"] == 16
    assert "keep_fraction=0.5" in g.text()
    variable = variable_values(g)
    assert {"%kept_rollout", "%kept_scores", "%policy_logprobs", "%advantages"} <= set(variable)
    assert variable["%advantages"] == 4   # a whole number of groups of 4
    assert "%rollout" not in variable and "%all" not in variable


@pytest.mark.parametrize("kwargs, message", [
    (dict(group_size=4, keep_fraction=0.0), r"keep_fraction=0.0 must be in \(0, 1\]"),
    (dict(group_size=4, keep_fraction=1.5), r"keep_fraction=1.5 must be in \(0, 1\]"),
    (dict(group_size=1, keep_fraction=0.5), r"group_size=1 has no baseline"),
    (dict(group_size=4, keep_fracton=0.5), r"unknown argument 'keep_fracton' \(did you "
                                           r"mean 'keep_fraction'\?\)"),
])
def test_bad_dynamic_sampling_options(kwargs, message):
    with pytest.raises(gr.TraceError, match=message):
        dapo_trace(lambda r, s, p: dict(zip("ab", ops.dynamic_sampling(r, s, **kwargs))))


def test_bad_overlong_options():
    with pytest.raises(gr.TraceError, match=r"0 < cache <= max_len, got max_len=4, cache=8"):
        dapo_trace(lambda r, s, p: {"s": ops.overlong_penalty(r, s, max_len=4, cache=8)})


@pytest.fixture(scope="module")
def text_job(tmp_path_factory):
    from word_problems import write_problems, write_tiny_llama

    d = tmp_path_factory.mktemp("text_dapo")
    return str(write_tiny_llama(d / "tiny", seed=0)), str(write_problems(d / "p.jsonl",
                                                                         n=64, seed=1))


def test_text_dapo_runs_and_refuses_contradictions(text_job):
    from word_problems import correct_answer

    ckpt, data = text_job
    exp = gr.recipes.text_dapo(ckpt, data, correct_answer, batch=4, group_size=4,
                               keep_fraction=0.5, max_new_tokens=4, overlong_cache=2,
                               mask_truncated=True, lr=1e-2)
    g = exp.program().graph
    assert {n.target for n in g.nodes} >= {"dynamic_sampling", "overlong_penalty",
                                           "mask_truncated"}
    assert next(n for n in g.nodes if n.target == "generate").outputs[0].spec.batch == 32
    summary = gr.run(exp, iterations=2, quiet=True)
    assert len(summary.rows) == 2 and summary.rows[-1]["tokens/response"] > 0
    with pytest.raises(gr.UsageError, match=r"text_dapo: keep_fraction=0 must be in "
                                            r"\(0, 1\].*overlong_cache=9 must be in"):
        gr.recipes.text_dapo(ckpt, data, correct_answer, keep_fraction=0,
                             max_new_tokens=4, overlong_cache=9)


def test_a_variable_batch_may_shrink_but_not_grow():
    from graphrl.backends.local import check_payload

    def body(r, s, policy):
        kept, ks = ops.dynamic_sampling(r, s, group_size=4, keep_fraction=0.5)
        return {"kept": kept, "ks": ks}
    g = dapo_trace(body).graph
    node = next(n for n in g.nodes if n.target == "dynamic_sampling")
    spec = node.outputs[1].spec                      # Scores[16]
    check_payload(node, spec, {"score": torch.zeros(8)}, variable=True)
    for rows in (0, 20):
        with pytest.raises(gr.ExecutionError, match=rf"field score has shape \({rows},\)"):
            check_payload(node, spec, {"score": torch.zeros(rows)}, variable=True)
    with pytest.raises(gr.ExecutionError, match=r"shape \(8,\)"):   # a fixed batch
        check_payload(node, spec, {"score": torch.zeros(8)})
