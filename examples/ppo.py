"""PPO (policy, reference, reward model, critic) on the synthetic topic-tokens task.

    python examples/ppo.py --iterations 40 --metrics ppo.jsonl --trace ppo_trace.json
    graphrl show examples/ppo.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphrl as gr  # noqa: E402
from common import (gpt2_config, policy_and_reference, reward_model,  # noqa: E402
                    rl_experiment, task_for, task_score, vocab_of)


def build(opts: gr.RunOptions) -> gr.Experiment:
    """PPO with a learned reward model on a synthetic task (graphrl example)."""
    task = task_for(opts)
    score_task = task_score(task)

    def ppo_step(prompts, policy, reference, reward, critic):
        rollout = policy.generate(prompts, max_new_tokens=task.response_len, temperature=1.0)
        old_logprobs = policy.forward(rollout)
        ref_logprobs = reference.forward(rollout)
        rm_score = reward.forward(rollout)
        values = critic.forward(rollout)
        advantages, returns = gr.ops.gae(rollout, rm_score, values, old_logprobs, ref_logprobs,
                                         gamma=1.0, lam=0.95, kl_coef=0.01)
        policy_stats = policy.train(loss="ppo", rollout=rollout, old_logprobs=old_logprobs,
                                    advantages=advantages, clip=0.2, epochs=2, minibatches=2)
        critic_stats = critic.train(loss="value", rollout=rollout, old_values=values,
                                    returns=returns, value_clip=0.5, epochs=2, minibatches=2)
        return {"task_score": score_task(rollout), "rm_score": rm_score,
                "policy_stats": policy_stats, "critic_stats": critic_stats}

    models = (*policy_and_reference(opts), reward_model(opts),
              gr.Model("critic", opts.config_for("critic", gpt2_config(vocab=vocab_of(opts))),
                       role="critic", head="value", trainable=True, options={"lr": 2e-3}))
    return rl_experiment("ppo_step", ppo_step, models, task, opts.batch_size or 64, opts)


if __name__ == "__main__":
    from graphrl.cli import example_main

    sys.exit(example_main(build))
