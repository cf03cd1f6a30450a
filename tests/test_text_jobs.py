"""Real jobs (issue 8): a local HF checkpoint, JSONL/Parquet prompts, EOS-stopped
responses with masks, rewards on text, save and reload, and `graphrl plot`."""
from __future__ import annotations

import json

import pytest
import torch

import graphrl as gr
from graphrl.data import PromptData, load_rows
from graphrl.errors import ExecutionError, UsageError
from word_problems import correct_answer, write_problems, write_tiny_llama


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    return write_problems(tmp_path_factory.mktemp("data") / "p.jsonl", n=64, seed=1)


def test_load_train_save_reload(ckpt, problems, tmp_path):
    import transformers

    exp = gr.recipes.text_grpo(str(ckpt), str(problems),
                               lambda response, answer: correct_answer(response, answer),
                               batch=4, group_size=4, max_new_tokens=4, lr=1e-2)
    out = tmp_path / "out"
    summary = gr.run(exp, iterations=2, save=str(out), quiet=True,
                     metrics=str(tmp_path / "m.jsonl"))
    row = summary.rows[-1]
    assert row["tokens/response"] > 0 and row["tokens/padding"] >= 0
    assert 1 <= row["response_length_mean"] <= 4
    before = transformers.AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)
    after = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    changed = [k for k, v in before.state_dict().items()
               if not torch.equal(v, after.state_dict()[k])]
    assert changed, "training changed no weight"
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "Tom has 3 apples"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp left


def test_eos_stops_rows_and_masks_what_follows(ckpt):
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.losses import grpo

    model = gr.Model("policy", str(ckpt), role="policy", trainable=True)
    eng = HFEngine(model.decl(), model.engine_options())
    eos = eng.tokens.eos_ids[0]
    prompts = {"tokens": torch.tensor([[1, 5, 6], [0, 1, 7]]),
               "attention_mask": torch.tensor([[1., 1, 1], [0, 1, 1]]), "row": torch.tensor([0, 1])}
    # EOS and three more stop ids: rows stop at different steps
    r = eng.generate(prompts, max_new_tokens=6, samples=8, seed=3, stop_token_ids=[9, 10, 11])
    resp, mask = r["response_mask"], r["attention_mask"]
    stopped = 0
    for b in range(r["tokens"].shape[0]):
        gen = resp[b, 3:]
        n = int(gen.sum())
        assert gen[:n].eq(1).all() and gen[n:].eq(0).all()   # a prefix, then nothing
        if n < 6:
            stopped += 1
            assert int(r["tokens"][b, 3 + n - 1]) in (eos, 9, 10, 11)
            assert r["tokens"][b, 3 + n:].eq(eng.tokens.pad_id).all()
            assert mask[b, 3 + n:].eq(0).all()
    assert stopped > 0
    # padding after the stop contributes nothing to the loss or the KL
    lp = eng.forward(r)["logprobs"]
    mb = {"rollout": r, "old_logprobs": {"logprobs": lp}, "ref_logprobs": {"logprobs": lp},
          "advantages": {"advantages": torch.randn(resp.shape) * resp}}
    base, _ = grpo(eng._head, mb)
    noisy = {**mb, "ref_logprobs": {"logprobs": lp + 5.0 * (1 - resp)},
             "advantages": {"advantages": mb["advantages"]["advantages"]
                            + 7.0 * (1 - resp)}}
    other, _ = grpo(eng._head, noisy)
    assert torch.allclose(base, other)


def test_left_padding_does_not_change_log_probs(ckpt):
    from graphrl.backends.engines.hf import HFEngine

    model = gr.Model("policy", str(ckpt), role="policy")
    eng = HFEngine(model.decl(), model.engine_options())
    short = {"tokens": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4)}
    padded = {"tokens": torch.tensor([[0, 0, 1, 5, 6, 7]]),
              "attention_mask": torch.tensor([[0., 0, 1, 1, 1, 1]])}
    a, b = eng.forward(short)["logprobs"], eng.forward(padded)["logprobs"]
    assert torch.allclose(a[0, 1:], b[0, 3:], atol=1e-5)


def test_jsonl_and_parquet_rows_and_errors(tmp_path):
    good = [{"prompt": "Tom has 1 pens", "answer": "1"}, {"prompt": "Ann has 2 pens", "answer": "2"}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in good) + "\n")
    pq = tmp_path / "d.parquet"
    import datasets

    datasets.Dataset.from_list(good).to_parquet(str(pq))
    for path in (jl, pq):
        rows = load_rows(str(path))
        assert [dict(r) for r in rows.rows] == good
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good[0]) + "\n{not json\n")
    with pytest.raises(UsageError, match=r"bad.jsonl line 2: not valid JSON"):
        load_rows(str(bad))
    bad.write_text(json.dumps(good[0]) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(UsageError, match=r"line 2: no field 'prompt' \(fields: question"):
        load_rows(str(bad))
    bad.write_text(json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(UsageError, match=r"line 1: field 'prompt' must be a non-empty string"):
        load_rows(str(bad))
    (tmp_path / "x.parquet").write_text("garbage")
    with pytest.raises(UsageError, match="not a readable Parquet file"):
        load_rows(str(tmp_path / "x.parquet"))


def test_batches_are_deterministic_and_left_padded(ckpt, problems):
    from graphrl.recipes import tokenizer_of

    tok = tokenizer_of(str(ckpt))
    rows = load_rows(str(problems))
    a = PromptData(rows, tok, batch=24, seed=5)
    b = PromptData(rows, tok, batch=24, seed=5)
    assert a.indices(2) == b.indices(2) and a.indices(2) != PromptData(
        rows, tok, batch=24, seed=6).indices(2)
    # epochs: every row once per epoch, order differs between epochs
    stream = [i for it in range(8) for i in a.indices(it)]   # 192 = 3 epochs of 64
    assert sorted(stream[:64]) == list(range(64)) and stream[:64] != stream[64:128]
    p = a.inputs(0)["prompts"]
    for t, m in zip(p["tokens"], p["attention_mask"]):
        n = int(m.sum())
        assert m[-n:].eq(1).all() and t[:-n].eq(a.pad_id).all()


def test_reward_errors_name_function_and_row(ckpt, problems):
    from graphrl.recipes import tokenizer_of
    from graphrl.rewards import text_reward

    data = PromptData(load_rows(str(problems)), tokenizer_of(str(ckpt)), batch=2)
    rollout = {"tokens": torch.tensor([[1, 2, 3]]), "response_mask": torch.tensor([[0., 1, 1]]),
               "row": torch.tensor([4])}

    def broken(response, answer):
        raise KeyError("boom")
    with pytest.raises(ExecutionError, match=r"reward function test_text_jobs.py:broken "
                                             r"raised on .*p.jsonl "
                                             r"line 5: KeyError"):
        text_reward(broken, data).fn(rollout)
    with pytest.raises(ExecutionError, match="returned 'yes'"):
        text_reward(lambda response: "yes", data).fn(rollout)
    with pytest.raises(UsageError, match="parameter 'answr' is neither"):
        text_reward(lambda response, answr: 1.0, data)
    assert text_reward(lambda **row: float(row["answer"]), data).fn(rollout)["score"].shape == (1,)


def test_plot_writes_png(tmp_path):
    from graphrl.cli import main

    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"iteration": i, "reward_mean": i / 10, "policy_stats/kl": 0.1,
                                     "response_length_mean": 3.0, "seconds/policy.train": 0.2})
                         + "\n" for i in range(5)))
    assert main(["plot", str(m), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    m.write_text("nonsense\n")
    assert main(["plot", str(m)]) == 2
