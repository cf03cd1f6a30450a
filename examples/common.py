"""What the PPO and GRPO examples share: the synthetic task, tiny model configs, the
rule-based scorer op and reward-model training (Bradley-Terry) before RL."""
from __future__ import annotations

from typing import Any, Mapping

import graphrl as gr
from graphrl.signatures import ROLLOUT, SCORES
from graphrl.synthetic import TopicTokensTask

TASK = TopicTokensTask(vocab_size=16, prompt_len=6, response_len=8)
LORA_TARGETS = ("q_proj", "v_proj", "lm_head")   # the examples' LoRA (docs/lora.md)
EVAL_PROMPTS = 32          # held-out prompts of --eval-every
HELD_OUT_SEED = 2_000_000_000   # + --seed: prompts seeded apart from the training batches


def llama_config(hidden: int = 64, layers: int = 2, heads: int = 4, context: int = 64,
                 vocab: int = TASK.vocab_size) -> dict[str, Any]:
    """A tiny Llama-shaped Hugging Face config (random init, built in code)."""
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=context)


def gpt2_config(hidden: int = 64, layers: int = 2, heads: int = 4,
                vocab: int = TASK.vocab_size) -> dict[str, Any]:
    """A tiny GPT-2-shaped Hugging Face config."""
    return dict(model_type="gpt2", vocab_size=vocab, n_embd=hidden, n_layer=layers,
                n_head=heads, n_inner=4 * hidden, n_positions=64)


def task_score(task: TopicTokensTask) -> gr.OpDef:
    """The rule-based scorer as an op node: Rollout -> Scores in [0, 1]."""
    return gr.ops.op("task_score", (ROLLOUT,), (("task_score", SCORES, (
        gr.Field("score", "f32", per_token=False),)),))(task.score_rollout)


def vocab_of(opts: gr.RunOptions) -> int:
    """The task's vocabulary: the policy directory's (--model DIR), so that every model
    reads the token ids the policy generates; else the tiny default."""
    policy = opts.model_dir("policy")
    if policy is None:
        return TASK.vocab_size
    from graphrl.hf_dir import read_config

    return int(read_config(policy)["vocab_size"])


def task_for(opts: gr.RunOptions) -> TopicTokensTask:
    return TopicTokensTask(vocab_of(opts), opts.prompt_len or TASK.prompt_len,
                           opts.response_len or TASK.response_len)


def policy_and_reference(opts: gr.RunOptions) -> tuple[gr.Model, gr.Model]:
    """The trained policy and its frozen reference, which starts as a copy of it (also of
    the policy's --model directory, unless the reference is given one of its own; with
    --lora policy: its shared base). LoRA adapters train at a 5x learning rate (their
    update is a low-rank product starting from B = 0; docs/lora.md)."""
    lora = opts.loras().get("policy")
    lr = 1e-2 if lora is not None else 2e-3
    # --lora policy without targets, on the example's own (untied) model: q_proj, v_proj
    # and the output head (choosing among 16 tokens is the task; docs/lora.md)
    own = lora is not None and not lora.targets and opts.model_dir("policy") is None
    lora = gr.LoRA(lora.r, lora.alpha, LORA_TARGETS, lora.dropout) if own else None
    return (gr.Model("policy", opts.config_for("policy", llama_config()), role="policy",
                     trainable=True, options={"lr": lr}, lora=lora),
            gr.Model("reference", opts.config_for("reference", opts.model_dir("policy")
                                                  or llama_config()),
                     role="reference", init_from="policy"))


def rl_experiment(name: str, step: Any, models: tuple[gr.Model, ...], task: TopicTokensTask,
                  prompts: int, opts: gr.RunOptions) -> gr.Experiment:
    """An example's Experiment: `prompts` prompts a step, reward model trained first."""
    return gr.Experiment(
        name=name, step=step, models=models,
        inputs={"prompts": gr.prompts_spec(prompts, task.prompt_len)},
        data=prompt_data(task, prompts, opts.seed), reward="task_score", iterations=60,
        prepare=lambda engines: train_reward_model(engines["reward"], task, opts.seed),
        evaluation=held_out(task, opts))


def held_out(task: TopicTokensTask, opts: gr.RunOptions) -> Any:
    """--eval-every: the task's rule-based score on EVAL_PROMPTS fixed prompts seeded
    apart from the training batches (seeds seed * 100003 + iteration; torch's CPU
    generator keeps a seed's low 32 bits, so this one stays below 2**32)."""
    options = gr.evaluation.eval_options(opts)
    if options is None:
        return None
    if opts.eval_data:
        raise gr.UsageError(f"--eval-data {opts.eval_data}: the synthetic task has no text "
                            "prompts (--eval-every alone evaluates on held-out synthetic "
                            "prompts)")
    seed = HELD_OUT_SEED + opts.seed
    return gr.evaluation.Evaluation(
        options, task.prompts(EVAL_PROMPTS, seed=seed),
        gr.prompts_spec(EVAL_PROMPTS, task.prompt_len), task_score(task),
        source=f"{EVAL_PROMPTS} held-out synthetic prompts (seed {seed})")


def reward_model(opts: gr.RunOptions) -> gr.Model:
    return gr.Model("reward", opts.config_for("reward", llama_config(vocab=vocab_of(opts))),
                    role="reward",
                    head="score", options={"lr": 1e-3})


def train_reward_model(engine: Any, task: TopicTokensTask, seed: int, pairs: int = 2048, epochs: int = 10,
                       minibatch: int = 32) -> Mapping[str, float]:
    """Fit the reward model on synthetic preference pairs ranked by the task score, then
    report its pairwise accuracy on held-out pairs."""
    import torch

    chosen, rejected = task.preference_pairs(pairs, seed=seed + 1)
    n = chosen["tokens"].shape[0] // minibatch * minibatch
    stats = engine.train({"chosen": {"tokens": chosen["tokens"][:n]},
                          "rejected": {"tokens": rejected["tokens"][:n]}},
                         loss="bradley_terry", seed=seed, epochs=epochs,
                         minibatches=n // minibatch)
    test_c, test_r = task.preference_pairs(512, seed=seed + 2)
    margin = engine.forward(test_c)["score"] - engine.forward(test_r)["score"]
    return {"rm_train_loss": stats["loss"],
            "rm_heldout_accuracy": float((margin > 0).float().mean()),
            "rm_pairs": float(n)}


def prompt_data(task: TopicTokensTask, batch: int, seed: int):
    """Iteration -> that iteration's prompts (seeded, reproducible)."""
    def data(iteration: int) -> dict[str, Any]:
        return {"prompts": task.prompts(batch, seed=seed * 100_003 + iteration)}
    return data
