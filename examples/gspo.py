"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization") on the synthetic
topic-tokens task: GRPO's group advantages with a sequence-level importance ratio.

GSPO replaces GRPO's per-token ratio pi(y_t) / pi_old(y_t) by one ratio per response,
s_i = exp(mean over its tokens of log pi(y_t) - log pi_old(y_t)) (eq. 7), clips it to
[1 - 3e-4, 1 + 4e-4] (the paper's ranges: a length-normalised ratio moves far less than
a token's) and averages the clipped objective over sequences (eq. 5). In graphrl that is
the ppo loss (the clipped surrogate, no KL term, as in the paper) with ratio="sequence",
clip=(3e-4, 4e-4) and aggregation="seq-mean-token-mean" (docs/algorithms.md). Two epochs of two minibatches per step, so the
later minibatches are off-policy and the clip is at work.

    graphrl run examples/gspo.py --iterations 60 --metrics gspo.jsonl
    graphrl compile examples/gspo.py --cluster 2x8xh100 --model-size 7b
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphrl as gr  # noqa: E402
from common import (policy_and_reference, reward_model, rl_experiment,  # noqa: E402
                    task_for, task_score)

GROUP_SIZE = 4
CLIP = (3e-4, 4e-4)      # GSPO's (low, high) on the sequence ratio (Zheng et al. 2025, §5.1)


def build(opts: gr.RunOptions) -> gr.Experiment:
    """GSPO with a learned reward model on a synthetic task (graphrl example)."""
    task = task_for(opts)
    score_task = task_score(task)

    def gspo_step(prompts, policy, reward):
        rollout = policy.generate(prompts, max_new_tokens=task.response_len, temperature=1.0,
                                  samples=GROUP_SIZE)
        old_logprobs = policy.forward(rollout)
        rm_score = reward.forward(rollout)
        advantages = gr.ops.group_advantages(rollout, rm_score, group_size=GROUP_SIZE)
        policy_stats = policy.train(loss="ppo", rollout=rollout, old_logprobs=old_logprobs,
                                    advantages=advantages, ratio="sequence", clip=CLIP,
                                    aggregation="seq-mean-token-mean", epochs=2,
                                    minibatches=2)
        return {"task_score": score_task(rollout), "rm_score": rm_score,
                "policy_stats": policy_stats}

    policy, _ = policy_and_reference(opts)
    return rl_experiment("gspo_step", gspo_step, (policy, reward_model(opts)), task,
                         opts.batch_size or 16, opts)


if __name__ == "__main__":
    from graphrl.cli import example_main

    sys.exit(example_main(build))
