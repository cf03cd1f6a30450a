"""ReMax (policy, reference, reward model; no critic) on the synthetic task.

Two generate calls on the same prompts: the sampled responses that train, and a greedy
one per prompt (temperature 0) whose score is their baseline (Li et al. 2023, "ReMax");
the compiler places and prices both. The KL to the reference is in the loss.

    python examples/remax.py --iterations 60 --seed 1 --metrics remax.jsonl
    graphrl show examples/remax.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphrl as gr  # noqa: E402
from common import (policy_and_reference, reward_model, rl_experiment,  # noqa: E402
                    task_for, task_score)

SAMPLES = 4


def build(opts: gr.RunOptions) -> gr.Experiment:
    """ReMax with a learned reward model on a synthetic task (graphrl example)."""
    task = task_for(opts)
    score_task = task_score(task)

    def remax_step(prompts, policy, reference, reward):
        rollout = policy.generate(prompts, max_new_tokens=task.response_len, temperature=1.0,
                                  samples=SAMPLES)
        greedy = policy.generate(prompts, max_new_tokens=task.response_len, temperature=0.0)
        old_logprobs = policy.forward(rollout)
        ref_logprobs = reference.forward(rollout)
        rm_score = reward.forward(rollout)
        greedy_score = reward.forward(greedy)
        advantages = gr.ops.remax(rollout, rm_score, greedy_score)
        policy_stats = policy.train(loss="grpo", rollout=rollout, old_logprobs=old_logprobs,
                                    ref_logprobs=ref_logprobs, advantages=advantages,
                                    clip=0.2, kl_coef=0.01, epochs=2, minibatches=2)
        return {"task_score": score_task(rollout), "rm_score": rm_score,
                "greedy_score": greedy_score, "policy_stats": policy_stats}

    models = (*policy_and_reference(opts), reward_model(opts))
    return rl_experiment("remax_step", remax_step, models, task, opts.batch_size or 16, opts)


if __name__ == "__main__":
    from graphrl.cli import example_main

    sys.exit(example_main(build))
