"""GRPO (policy, reference, reward model; no critic) on the synthetic topic-tokens task.

Each prompt is answered `group_size` times; a sample's advantage is its reward-model
score normalised within its group (Shao et al. 2024).

    python examples/grpo.py --iterations 60 --metrics grpo.jsonl --trace grpo_trace.json
    graphrl show examples/grpo.py
    graphrl run examples/grpo.py --loss my_loss.py:my_pg    # your own @graphrl.loss
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
    """GRPO with a learned reward model on a synthetic task (graphrl example)."""
    task = task_for(opts)
    score_task = task_score(task)
    # a user's loss (--loss FILE.py:NAME) takes the payloads it declares, GRPO's its own
    user = gr.load_loss(opts.loss) if opts.loss else None

    def grpo_step(prompts, policy, reference, reward):
        rollout = policy.generate(prompts, max_new_tokens=task.response_len, temperature=1.0,
                                  samples=GROUP_SIZE)
        old_logprobs = policy.forward(rollout)
        ref_logprobs = reference.forward(rollout)
        rm_score = reward.forward(rollout)
        advantages = gr.ops.group_advantages(rollout, rm_score, group_size=GROUP_SIZE)
        if user is not None:
            given = dict(rollout=rollout, old_logprobs=old_logprobs,
                         ref_logprobs=ref_logprobs, advantages=advantages)
            policy_stats = policy.train(loss=user, epochs=2, minibatches=2,
                                        **{k: given[k] for k, _ in user.inputs if k in given})
        else:
            policy_stats = policy.train(loss="grpo", rollout=rollout,
                                        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                        advantages=advantages, clip=0.2, kl_coef=0.01,
                                        epochs=2, minibatches=2)
        return {"task_score": score_task(rollout), "rm_score": rm_score,
                "policy_stats": policy_stats}

    models = (*policy_and_reference(opts), reward_model(opts))
    return rl_experiment("grpo_step", grpo_step, models, task, opts.batch_size or 16, opts)


if __name__ == "__main__":
    from graphrl.cli import example_main

    sys.exit(example_main(build))
