"""Ready-made experiments over a user's own model directory, data file and reward function.

    import graphrl as gr

    def reward(prompt, response, answer):
        return float(response.split()[-1:] == [answer])

    exp = gr.recipes.text_grpo("my-llama/", "train.jsonl", reward, max_new_tokens=64)
    gr.run(exp, iterations=200, save="my-llama-rl/", metrics="metrics.jsonl")
"""
from __future__ import annotations

from typing import Any, Callable

from .data import PromptData, load_rows
from .errors import UsageError
from .evaluation import EvalOptions, text_evaluation
from .example_file import load_python_file
from .experiment import Experiment
from .ops import group_advantages
from .rewards import text_reward
from .signatures import prompts_spec
from .trace import Model


def load_reward(spec: str) -> Callable[..., Any]:
    """`FILE.py:function` -> that function (FILE runs as Python, as `graphrl run` does)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"--reward {spec}: expected FILE.py:FUNCTION")
    module = load_python_file(path, f"--reward {spec}")
    fn = getattr(module, name, None)
    if not callable(fn):
        from .nearest import suggest

        functions = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise UsageError(f"--reward {spec}: {path} defines no function {name!r}"
                         f"{suggest(name, functions)}")
    return fn


def tokenizer_of(model_dir: str) -> Any:
    """The tokenizer saved in a local model directory."""
    from graphrl.backends.engines.hf_checkpoint import load_tokenizer

    return load_tokenizer(model_dir)


def text_grpo(policy: str, data: str, reward: Callable[..., Any], *, batch: int = 16,
              group_size: int = 8, max_new_tokens: int = 32, temperature: float = 1.0,
              top_p: float = 1.0, prompt_field: str = "prompt", chat_template: bool = False,
              prompt_len: int | None = None, lr: float = 1e-4, kl_coef: float = 0.01,
              clip: float = 0.2, epochs: int = 1, minibatches: int = 1, seed: int = 0,
              iterations: int = 100, name: str = "text_grpo",
              reward_timeout: float | None = None, eval_data: str | None = None,
              evaluation: EvalOptions | None = None) -> Experiment:
    """GRPO (Shao et al. 2024) of the causal LM in directory `policy` on the prompts of
    `data` (JSONL or Parquet), scored by `reward` over text (graphrl.rewards): each
    prompt is answered `group_size` times and a response's advantage is its reward
    normalised within its group; the reference is the starting policy (k3 KL,
    `kl_coef`). Responses stop at the tokenizer's EOS or after `max_new_tokens`; each
    reward call must return within `reward_timeout` seconds (default 60).
    `evaluation` (graphrl.evaluation.EvalOptions): score the prompts of `eval_data`
    every `evaluation.every` iterations with `reward`, inside the step's graph."""
    if batch < 1 or group_size < 2:
        raise UsageError(f"text_grpo: batch must be >= 1 and group_size >= 2, got "
                         f"{batch} and {group_size}")
    rows = load_rows(data, prompt_field)
    prompts = PromptData(rows, tokenizer_of(policy), batch=batch, seed=seed,
                         prompt_len=prompt_len, chat_template=chat_template)
    score = text_reward(reward, prompts, timeout=reward_timeout)
    models = (Model("policy", policy, role="policy", trainable=True, options={"lr": lr}),
              Model("reference", policy, role="reference"))

    def grpo_step(prompts, policy, reference):
        rollout = policy.generate(prompts, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, samples=group_size)
        old_logprobs = policy.forward(rollout)
        ref_logprobs = reference.forward(rollout)
        scores = score(rollout)
        advantages = group_advantages(rollout, scores, group_size=group_size)
        policy_stats = policy.train(loss="grpo", rollout=rollout, old_logprobs=old_logprobs,
                                    ref_logprobs=ref_logprobs, advantages=advantages,
                                    clip=clip, kl_coef=kl_coef, epochs=epochs,
                                    minibatches=minibatches)
        return {"reward": scores, "rollout": rollout, "policy_stats": policy_stats}

    held_out = None
    if eval_data is not None and evaluation is None:
        raise UsageError(f"text_grpo: eval_data={eval_data!r} needs evaluation="
                         "graphrl.evaluation.EvalOptions(every=N) (how often to evaluate)")
    if evaluation is not None:
        if eval_data is None:
            raise UsageError("--eval-every: text runs evaluate on held-out prompts: give "
                             "--eval-data FILE (eval_data=)")
        held_out = text_evaluation(eval_data, evaluation, reward, prompts.tokenizer,
                                   prompt_field=prompt_field, chat_template=chat_template,
                                   timeout=reward_timeout)
    return Experiment(name=name, step=grpo_step, models=models,
                      inputs={"prompts": prompts_spec(batch, prompts.prompt_len)},
                      data=prompts.inputs, reward="reward", iterations=iterations,
                      notes={"data": data, "rows": len(rows), "policy": policy},
                      evaluation=held_out)


def text_dapo(policy: str, data: str, reward: Callable[..., Any], *, batch: int = 16,
              group_size: int = 8, keep_fraction: float = 0.5, max_new_tokens: int = 32,
              overlong_cache: int = 0, mask_truncated: bool = False,
              clip: Any = (0.2, 0.28), temperature: float = 1.0, top_p: float = 1.0,
              prompt_field: str = "prompt", chat_template: bool = False,
              prompt_len: int | None = None, lr: float = 1e-4, epochs: int = 1,
              minibatches: int = 1, seed: int = 0, iterations: int = 100,
              reward_timeout: float | None = None, name: str = "text_dapo") -> Experiment:
    """DAPO (Yu et al. 2025) of the causal LM in directory `policy` on the prompts of
    `data`, scored by `reward` over text: `group_size` responses a prompt; dynamic
    sampling keeps the groups whose rewards differ (graphrl/sampling.py): the step
    generates round(batch / keep_fraction) prompts' groups and trains on at most `batch`
    of them (fewer when fewer differ); group-normalised advantages; PPO's clipped
    surrogate with DAPO's clip-higher range `clip=(low, high)`, averaged over all kept
    response tokens (aggregation token-mean); no reference, no KL; each reward call must
    return within `reward_timeout` seconds (default 60).
    `overlong_cache` L > 0: the soft overlong penalty over the last L tokens before
    max_new_tokens (DAPO eq. 13); `mask_truncated`: responses cut off at max_new_tokens
    (no EOS) are left out of the loss."""
    from .ops import dynamic_sampling, mask_truncated as mask_op, overlong_penalty

    problems = []
    if batch < 1 or group_size < 2:
        problems.append(f"batch must be >= 1 and group_size >= 2, got {batch} and "
                        f"{group_size}")
    if not 0 < keep_fraction <= 1:
        problems.append(f"keep_fraction={keep_fraction} must be in (0, 1]: the expected "
                        "share of groups whose rewards differ")
    if not 0 <= overlong_cache <= max_new_tokens:
        problems.append(f"overlong_cache={overlong_cache} must be in [0, max_new_tokens="
                        f"{max_new_tokens}]: the penalised tokens before the limit")
    if problems:
        raise UsageError(f"{name}: " + "; ".join(problems))
    rows = load_rows(data, prompt_field)
    tokenizer = tokenizer_of(policy)
    generated = round(batch / keep_fraction)
    prompts = PromptData(rows, tokenizer, batch=generated, seed=seed,
                         prompt_len=prompt_len, chat_template=chat_template)
    score = text_reward(reward, prompts, timeout=reward_timeout)
    eos = tokenizer.eos_token_id
    models = (Model("policy", policy, role="policy", trainable=True, options={"lr": lr}),)

    def dapo_step(prompts, policy):
        rollout = policy.generate(prompts, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, samples=group_size)
        scores = score(rollout)
        shaped = (overlong_penalty(rollout, scores, max_len=max_new_tokens,
                                   cache=overlong_cache) if overlong_cache else scores)
        kept, kept_scores = dynamic_sampling(rollout, shaped, group_size=group_size,
                                             keep_fraction=batch / generated)
        old_logprobs = policy.forward(kept)
        advantages = group_advantages(kept, kept_scores, group_size=group_size)
        trained = (mask_op(kept, max_new_tokens=max_new_tokens,
                           eos_id=-1 if eos is None else int(eos)) if mask_truncated else kept)
        policy_stats = policy.train(loss="ppo", rollout=trained, old_logprobs=old_logprobs,
                                    advantages=advantages, clip=clip, epochs=epochs,
                                    minibatches=minibatches)
        return {"reward": scores, "rollout": rollout, "policy_stats": policy_stats}

    return Experiment(name=name, step=dapo_step, models=models,
                      inputs={"prompts": prompts_spec(generated, prompts.prompt_len)},
                      data=prompts.inputs, reward="reward", iterations=iterations,
                      notes={"data": data, "rows": len(rows), "policy": policy})
