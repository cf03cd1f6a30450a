"""GRPO on text: your model directory, your prompts file, your reward function.

    python examples/text_grpo.py --model DIR --data FILE.jsonl --iterations 200 \
        --save OUT --metrics m.jsonl [--reward my_reward.py:score]
    graphrl run examples/text_grpo.py ...      (the same)
    graphrl plot m.jsonl                       (reward, KL, response length, seconds)

Without --model it builds a tiny Llama and a word-level tokenizer in code and saves them
under --run-dir (default runs/) as a Hugging Face directory; without --data it writes
arithmetic word problems there ("Tom has 3 apples and buys 4 more . How many apples does
Tom have ?", answer "7"). The default reward is 1 when the last number of the response
equals the row's `answer`. `--eval-data FILE --eval-every N` scores held-out prompts
(same fields) every N iterations (eval/... keys in the metrics; graphrl.evaluation);
without --data and --eval-data it writes 64 problems the training file lacks there.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphrl as gr  # noqa: E402
from word_problems import (correct_answer, write_held_out, write_problems,  # noqa: E402
                           write_tiny_llama)


def answer_reward(response: str, answer: str) -> float:
    return correct_answer(response, answer)


def build(opts: gr.RunOptions) -> gr.Experiment:
    """GRPO of a causal LM on text prompts with a reward function (graphrl example)."""
    run_dir = Path(opts.files_dir) / "text_grpo"
    policy = opts.model_dir("policy")
    if policy is None:
        tiny = run_dir / f"tiny-llama-seed{opts.seed}"
        policy = str(tiny if (tiny / "config.json").is_file()
                     else write_tiny_llama(tiny, seed=opts.seed))
    data, eval_data = opts.data, opts.eval_data
    if data is None:
        file = run_dir / "word_problems.jsonl"
        data = str(file if file.is_file() else write_problems(file))
        if opts.eval_every and eval_data is None:   # 64 problems the run never trains on
            held = run_dir / "word_problems_held_out.jsonl"
            eval_data = str(held if held.is_file() else write_held_out(held, Path(data)))
    reward = gr.recipes.load_reward(opts.reward) if opts.reward else answer_reward
    return gr.recipes.text_grpo(policy, data, reward, batch=opts.batch_size or 16,
                                group_size=8, max_new_tokens=opts.response_len or 4,
                                prompt_field=opts.prompt_field,
                                chat_template=opts.chat_template, prompt_len=opts.prompt_len,
                                lr=1.5e-2 if "policy" in opts.loras() else 3e-3,   # LoRA: 5x
                                kl_coef=0.01, seed=opts.seed, iterations=400,
                                reward_timeout=opts.reward_timeout,
                                eval_data=eval_data,
                                evaluation=gr.evaluation.eval_options(opts))


if __name__ == "__main__":
    from graphrl.cli import example_main

    sys.exit(example_main(build))
