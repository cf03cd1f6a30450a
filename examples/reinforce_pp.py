"""REINFORCE++ (policy, reference, reward model; no critic) on the synthetic task.

The KL to the reference is a per-token reward, the return is the sum of the rewards to
come, and the advantage is that return normalised over the whole batch's response tokens
(Hu 2025, "REINFORCE++"); the loss is PPO's clipped surrogate. `--baseline` style (group
mean subtracted, KL in the loss) is gr.ops.reinforce_pp_baseline.

    python examples/reinforce_pp.py --iterations 60 --seed 1 --metrics rpp.jsonl
    graphrl show examples/reinforce_pp.py
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
    """REINFORCE++ with a learned reward model on a synthetic task (graphrl example)."""
    task = task_for(opts)
    score_task = task_score(task)

    def reinforce_pp_step(prompts, policy, reference, reward):
        rollout = policy.generate(prompts, max_new_tokens=task.response_len, temperature=1.0,
                                  samples=SAMPLES)
        old_logprobs = policy.forward(rollout)
        ref_logprobs = reference.forward(rollout)
        rm_score = reward.forward(rollout)
        advantages = gr.ops.reinforce_pp(rollout, rm_score, old_logprobs, ref_logprobs,
                                         kl_coef=0.01, gamma=1.0)
        policy_stats = policy.train(loss="ppo", rollout=rollout, old_logprobs=old_logprobs,
                                    advantages=advantages, clip=0.2, epochs=2, minibatches=2)
        return {"task_score": score_task(rollout), "rm_score": rm_score,
                "policy_stats": policy_stats}

    models = (*policy_and_reference(opts), reward_model(opts))
    return rl_experiment("reinforce_pp_step", reinforce_pp_step, models, task,
                         opts.batch_size or 16, opts)


if __name__ == "__main__":
    from graphrl.cli import example_main

    sys.exit(example_main(build))
