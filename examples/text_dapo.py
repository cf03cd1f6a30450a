"""DAPO on text: your model directory, your prompts file, your reward function.

    python examples/text_dapo.py --model policy=DIR --data FILE.jsonl --iterations 200 \
        --save OUT --metrics m.jsonl [--reward my_reward.py:score]
    graphrl run examples/text_dapo.py ...      (the same)

As examples/text_grpo.py (a tiny Llama and arithmetic word problems are built under
--run-dir when --model / --data are not given), trained with DAPO (Yu et al. 2025):
dynamic sampling over twice the prompts (keep_fraction 0.5), clip-higher, a token-level
loss, no KL, the soft overlong penalty over the last 2 of the --response-len tokens and
truncated responses masked out of the loss (graphrl.recipes.text_dapo).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphrl as gr  # noqa: E402
from word_problems import correct_answer, write_problems, write_tiny_llama  # noqa: E402


def build(opts: gr.RunOptions) -> gr.Experiment:
    """DAPO of a causal LM on text prompts with a reward function (graphrl example)."""
    run_dir = Path(opts.files_dir) / "text_grpo"   # the same tiny model and problems
    policy = opts.model_dir("policy")
    if policy is None:
        tiny = run_dir / f"tiny-llama-seed{opts.seed}"
        policy = str(tiny if (tiny / "config.json").is_file()
                     else write_tiny_llama(tiny, seed=opts.seed))
    data = opts.data
    if data is None:
        file = run_dir / "word_problems.jsonl"
        data = str(file if file.is_file() else write_problems(file))
    reward = gr.recipes.load_reward(opts.reward) if opts.reward else correct_answer
    return gr.recipes.text_dapo(policy, data, reward, batch=opts.batch_size or 16,
                                group_size=8, keep_fraction=0.5,
                                max_new_tokens=opts.response_len or 4, overlong_cache=2,
                                mask_truncated=True, clip=(0.2, 0.28),
                                prompt_field=opts.prompt_field,
                                chat_template=opts.chat_template, prompt_len=opts.prompt_len,
                                lr=3e-3, seed=opts.seed, iterations=400)


if __name__ == "__main__":
    from graphrl.cli import example_main

    sys.exit(example_main(build))
