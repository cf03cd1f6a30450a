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
