"""RLOO (policy, reference, reward model; no critic) on the synthetic topic-tokens task.

Each prompt is answered `group_size` times; a sample's baseline is the mean score of the
other samples of its prompt (Ahmadian et al. 2024, "Back to Basics"), the KL to the
reference is in the loss.

    python examples/rloo.py --iterations 60 --seed 1 --metrics rloo.jsonl
    graphrl show examples/rloo.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphrl as gr  # noqa: E402
from common import (policy_and_reference, reward_model, rl_experiment,  # noqa: E402
                    task_for, task_score)

GROUP_SIZE = 4


def build(opts: gr.RunOptions) -> gr.Experiment:
    """RLOO with a learned reward model on a synthetic task (graphrl example)."""
    task = task_for(opts)
    score_task = task_score(task)

    def rloo_step(prompts, policy, reference, reward):
        rollout = policy.generate(prompts, max_new_tokens=task.response_len, temperature=1.0,
                                  samples=GROUP_SIZE)
        old_logprobs = policy.forward(rollout)
        ref_logprobs = reference.forward(rollout)
        rm_score = reward.forward(rollout)
        advantages = gr.ops.rloo(rollout, rm_score, group_size=GROUP_SIZE)
        policy_stats = policy.train(loss="grpo", rollout=rollout, old_logprobs=old_logprobs,
                                    ref_logprobs=ref_logprobs, advantages=advantages,
                                    clip=0.2, kl_coef=0.01, epochs=2, minibatches=2)
        return {"task_score": score_task(rollout), "rm_score": rm_score,
                "policy_stats": policy_stats}

    models = (*policy_and_reference(opts), reward_model(opts))
    return rl_experiment("rloo_step", rloo_step, models, task, opts.batch_size or 16, opts)


if __name__ == "__main__":
    from graphrl.cli import example_main

    sys.exit(example_main(build))
