"""DAPO (policy only: no reference, no reward model) on the synthetic task.

DAPO (Yu et al. 2025) as graphrl ops: a rule-based accuracy reward (a response is right
when >= 75% of its tokens come from the half the topic asks for), dynamic sampling (the
groups whose accuracies are all equal carry no gradient and are dropped), clip-higher
(clip=(0.2, 0.28)) and a token-level loss (PPO's surrogate averaged over all the kept
response tokens: aggregation token-mean), no KL.

To keep the trained batch full, the step generates an oversampled batch: 1/KEEP_FRACTION
times the prompts (the expected share of groups with varied rewards). The plan prices
generation of the oversampled batch and the calls after the filter on the kept one; at
run time the kept batch varies (fewer groups than planned: it trains on fewer; more:
the first ones; graphrl/sampling.py). The overlong penalty and truncation masking act on
text with EOS (graphrl.recipes.text_dapo, examples/text_dapo.py): here every response
has the full response_len tokens, so they would change nothing.

    python examples/dapo.py --iterations 60 --seed 1 --metrics dapo.jsonl
    graphrl show examples/dapo.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphrl as gr  # noqa: E402
from common import policy_and_reference, prompt_data, task_for, task_score  # noqa: E402
from graphrl.signatures import ROLLOUT, SCORES  # noqa: E402

GROUP_SIZE = 4
KEEP_FRACTION = 0.5   # expected share of groups with varied accuracy: generate 2x prompts
THRESHOLD = 0.75


def build(opts: gr.RunOptions, keep_fraction: float = KEEP_FRACTION) -> gr.Experiment:
    """DAPO with dynamic sampling on a synthetic task (graphrl example)."""
    task = task_for(opts)
    score_task = task_score(task)

    @gr.ops.op("accuracy", (ROLLOUT,), (("accuracy", SCORES, (
        gr.Field("score", "f32", per_token=False),)),))
    def accuracy(rollout):
        return {"score": (task.score(rollout["tokens"]) >= THRESHOLD).float()}

    def dapo_step(prompts, policy):
        rollout = policy.generate(prompts, max_new_tokens=task.response_len, temperature=1.0,
                                  samples=GROUP_SIZE)
        kept, kept_accuracy = gr.ops.dynamic_sampling(rollout, accuracy(rollout),
                                                      group_size=GROUP_SIZE,
                                                      keep_fraction=keep_fraction)
        old_logprobs = policy.forward(kept)
        advantages = gr.ops.group_advantages(kept, kept_accuracy, group_size=GROUP_SIZE)
        policy_stats = policy.train(loss="ppo", rollout=kept, old_logprobs=old_logprobs,
                                    advantages=advantages, clip=(0.2, 0.28),
                                    aggregation="token-mean", epochs=2, minibatches=2)
        return {"task_score": score_task(rollout), "kept": kept, "policy_stats": policy_stats}

    trained = opts.batch_size or 16   # prompts whose groups train each step (planned)
    prompts = round(trained / keep_fraction)
    return gr.Experiment(name="dapo_step", step=dapo_step,
                         models=(policy_and_reference(opts)[0],),
                         inputs={"prompts": gr.prompts_spec(prompts, task.prompt_len)},
                         data=prompt_data(task, prompts, opts.seed), reward="task_score",
                         iterations=60)


if __name__ == "__main__":
    from graphrl.cli import example_main

    sys.exit(example_main(build))
