"""The same GRPO workload in graphrl and in TRL's GRPOTrainer, side by side.

Workload (both sides): a random Llama built in code (tiny: hidden 64, 2 layers; 3M: vocab
512, hidden 256, 4 layers), the synthetic topic-tokens task scored by its rule (no reward
model), 16 prompts of 6 tokens a step, 4 samples each at temperature 1, fixed response
length (16 or 64 new tokens, no EOS), group-normalised advantages (std-scaled), clipped
surrogate with clip 0.2, KL (k3) to a frozen reference with coefficient 0.01, one
optimizer step per generation on the token-level mean over the batch (TRL loss_type
"bnpo"), AdamW lr 1e-3, betas (0.9, 0.95), no weight decay, grad clip 1.0, 2 threads.
graphrl runs policy and reference on engine="fast".

Precision, matched on both sides (`--precisions`, default both): `bf16` is graphrl's
default (`precision="bf16"`: bf16 compute, fp32 master weights and Adam state, the frozen
reference held in bf16) against TRL's `bf16=True` (its GRPOConfig default: accelerate's
bf16 autocast over fp32 weights); `fp32` is `precision="fp32"` against TRL `bf16=False`.

Interleaving: each (size, length) runs as alternating child processes
(a whole graphrl run, a whole TRL run, again, ...; each from the same initial seed) so
both see the same machine load; the report gives the median seconds per step of each
(the first step of each run excluded as warm-up) and the mean rewards over the first and
last 5 of the same number of steps (averaged over the repetitions).

    make trl                               # installs TRL into .venv (not part of make test)
    .venv/bin/python benchmarks/vs_trl.py --out docs/vs_trl.json   # prints the table too
    .venv/bin/python benchmarks/vs_trl.py --table docs/vs_trl.json # the table of a run
    .venv/bin/python benchmarks/vs_trl.py --lora --out docs/vs_trl_lora.json   # LoRA on both
"""
from __future__ import annotations

import argparse
import json
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"tiny": (16, 64, 2, 4), "3M": (512, 256, 4, 4)}   # vocab, hidden, layers, heads
PROMPTS, GROUP, PROMPT_LEN, LR, BETA, CLIP = 16, 4, 6, 1e-3, 0.01, 0.2
# --lora: the same adapters on both sides (graphrl's gr.LoRA through peft; TRL's
# peft_config), the reference the policy's base with the adapters off on both
LORA_R, LORA_ALPHA, LORA_TARGETS = 16, 32, ("q_proj", "v_proj")


def llama_dict(size: str) -> dict:
    vocab, hidden, layers, heads = SIZES[size]
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=128)


def task(size: str, length: int):
    from graphrl.synthetic import TopicTokensTask

    return TopicTokensTask(SIZES[size][0], PROMPT_LEN, length)


# -- graphrl ---------------------------------------------------------------------------------
def run_graphrl(size: str, length: int, steps: int, seed: int,
                old_forward: bool = False, precision: str = "fp32", lora: bool = False) -> dict:
    import graphrl as gr
    from graphrl.backends.local import LocalExecutor
    from graphrl.signatures import ROLLOUT, SCORES

    t = task(size, length)
    score = gr.ops.op("task_score", (ROLLOUT,), (("task_score", SCORES, (
        gr.Field("score", "f32", per_token=False),)),))(t.score_rollout)

    def step(prompts, policy, reference):
        rollout = policy.generate(prompts, max_new_tokens=length, temperature=1.0,
                                  samples=GROUP, stop_at_eos=False)
        # one optimizer pass per rollout: on-policy, the train forward's own log-probs
        # (detached) are the old ones, as TRL does with num_iterations=1
        old = {"old_logprobs": policy.forward(rollout)} if old_forward else {}
        ref = reference.forward(rollout)
        s = score(rollout)
        adv = gr.ops.group_advantages(rollout, s, group_size=GROUP)
        stats = policy.train(loss="grpo", rollout=rollout, ref_logprobs=ref,
                             advantages=adv, clip=CLIP, kl_coef=BETA, **old)
        return {"task_score": s, "policy_stats": stats}

    opts = {"lr": LR, "betas": (0.9, 0.95), "weight_decay": 0.0, "grad_clip": 1.0}
    adapters = gr.LoRA(LORA_R, LORA_ALPHA, LORA_TARGETS) if lora else None
    models = (gr.Model("policy", llama_dict(size), role="policy", trainable=True,
                       engine="fast", options=opts, precision=precision, lora=adapters),
              gr.Model("reference", llama_dict(size), role="reference",
                       engine="fast", precision=precision,
                       **({"shares_base": "policy"} if lora else {"init_from": "policy"})))
    exp = gr.Experiment(name="grpo_vs_trl", step=step, models=models,
                        inputs={"prompts": gr.prompts_spec(PROMPTS, PROMPT_LEN)},
                        data=lambda i: {"prompts": t.prompts(PROMPTS, seed=seed * 7919 + i)},
                        reward="task_score", iterations=steps)
    ex = LocalExecutor(exp.program(), seed=seed)
    times, cpu, rewards = [], [], []
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = ex.run_step(exp.data(i), i).outputs
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        rewards.append(float(out["task_score"]["score"].mean()))
    return {"times": times, "cpu_times": cpu, "rewards": rewards}


# -- TRL -------------------------------------------------------------------------------------
def word_tokenizer(vocab: int):
    """A whitespace tokenizer over ids t0..t{vocab-1} (plus pad/eos that never appear in
    prompts), built in code: token tN has id N, so both sides see the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    words.update({"<pad>": vocab, "<eos>": vocab + 1})
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def run_trl(size: str, length: int, steps: int, seed: int,
            checkpointing: bool = False, precision: str = "fp32", lora: bool = False) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    t = task(size, length)
    vocab = SIZES[size][0]
    tokenizer = word_tokenizer(vocab)
    state = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    cfg = dict(llama_dict(size))
    cfg["vocab_size"] = vocab + 2          # pad/eos ids exist but are never sampled
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"},
                                      pad_token_id=vocab, eos_token_id=vocab + 1)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    # TRL builds its reference model from a path (from_pretrained), so hand it one
    model.save_pretrained(state / "init")
    prompts = []
    for i in range(steps):
        toks = t.prompts(PROMPTS, seed=seed * 7919 + i)["tokens"]
        prompts += [" ".join(f"t{x}" for x in row.tolist()) for row in toks]
    data = Dataset.from_dict({"prompt": prompts})

    rewards: list[float] = []

    def reward(prompts, completions, completion_ids, **_):
        p = torch.tensor([[int(w[1:]) for w in s.split()] for s in prompts])
        c = torch.tensor([list(ids) + [0] * (length - len(ids)) for ids in completion_ids])
        r = t.score(torch.cat([p, c], dim=1))
        rewards.append(float(r.mean()))
        return r.tolist()

    times: list[float] = []
    cpu: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    args = GRPOConfig(
        output_dir=str(state / "out"), per_device_train_batch_size=PROMPTS * GROUP,
        num_generations=GROUP, max_completion_length=length, temperature=1.0, top_k=0,
        top_p=1.0, beta=BETA, epsilon=CLIP, num_iterations=1, steps_per_generation=1,
        loss_type="bnpo", scale_rewards="group", learning_rate=LR, adam_beta1=0.9,
        adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        warmup_steps=0, max_steps=steps, num_train_epochs=1, logging_steps=10 ** 6,
        save_strategy="no", report_to=[], use_cpu=True, bf16=precision == "bf16",
        fp16=False,
        seed=seed, data_seed=seed, shuffle_dataset=False, dataloader_num_workers=0,
        log_completions=False, disable_tqdm=True,
        # TRL's GRPOConfig turns activation checkpointing on by default: a second forward
        # in every backward; off, as graphrl trains (--trl-checkpointing: TRL's default)
        gradient_checkpointing=checkpointing,
        # pad/eos are never sampled: every response is exactly `length` tokens, as in graphrl
        generation_kwargs={"suppress_tokens": [vocab, vocab + 1]})
    peft = {}
    if lora:
        from peft import LoraConfig

        peft["peft_config"] = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                         target_modules=list(LORA_TARGETS),
                                         task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(state / "init"), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Clock()], **peft)
    trainer.train()
    shutil.rmtree(state, ignore_errors=True)
    return {"times": times, "cpu_times": cpu, "rewards": rewards}


# -- driver ----------------------------------------------------------------------------------
def child(argv: list[str]) -> None:
    import torch

    which, size, length, steps, seed, threads, flag, precision, lora = argv
    torch.set_num_threads(int(threads))
    fn = run_graphrl if which == "graphrl" else run_trl
    print("RESULT " + json.dumps(fn(size, int(length), int(steps), int(seed), flag == "1",
                                    precision, lora == "1")))


def run(which: str, size: str, length: int, steps: int, seed: int, threads: int,
        flag: bool, precision: str, lora: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", which, size, str(length), str(steps),
           str(seed), str(threads), str(int(flag)), precision, str(int(lora))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT,
                         env={"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                              "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{which} {size} {length}: no result\n{out.stderr[-3000:]}")


def _load() -> float:
    """The 1-minute load average (how busy the machine was), -1 where unknown."""
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def table(rows: list[dict]) -> str:
    """The markdown table of docs/vs_trl.md from the rows a run wrote (--out)."""
    lines = ["| precision | model | response tokens | graphrl s/step | TRL s/step | TRL / graphrl (wall) "
             "| TRL / graphrl (CPU s) | load | graphrl reward (first 5 -> last 5) "
             "| TRL reward (first 5 -> last 5) |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(
            f"| {r.get('precision', 'fp32')}{' LoRA' if r.get('lora') else ''} | {r['size']} | {r['response_len']} | {r['graphrl_s_per_step']:.3f} "
            f"| {r['trl_s_per_step']:.3f} | **{r['speedup']:.2f}x** "
            f"| {r.get('cpu_speedup', float('nan')):.2f}x | {r.get('load_avg_1min', -1):.1f} "
            f"| {r['graphrl_reward_first5']} -> {r['graphrl_reward_last5']} "
            f"| {r['trl_reward_first5']} -> {r['trl_reward_last5']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--reps", type=int, default=2, help="runs of each, alternating")
    ap.add_argument("--steps", type=int, default=10, help="steps per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"],
                    choices=["bf16", "fp32"],
                    help="each side at the same precision (bf16: graphrl's default and "
                         "TRL's bf16=True; fp32: both off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--old-forward", action="store_true",
                    help="graphrl also runs the old-log-prob forward (off-policy form)")
    ap.add_argument("--trl-checkpointing", action="store_true",
                    help="TRL with its default activation checkpointing")
    ap.add_argument("--profile", nargs=2, metavar=("SIZE", "LEN"),
                    help="cProfile graphrl's steps at one size/length instead")
    ap.add_argument("--profile-trl", action="store_true", help="--profile TRL's steps")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a run's --out")
    ap.add_argument("--lora", action="store_true",
                    help=f"LoRA on both sides (r={LORA_R}, alpha={LORA_ALPHA}, "
                         f"{'+'.join(LORA_TARGETS)}; graphrl's reference the shared base, "
                         "TRL's peft_config)")
    ap.add_argument("--child", nargs=9)
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return
    if a.table:
        print(table(json.loads(Path(a.table).read_text())["rows"]))
        return
    if a.profile:
        from bench_profile import profile_steps

        size, length = a.profile[0], int(a.profile[1])
        p = a.precisions[0]
        if a.profile_trl:
            profile_steps(lambda n: run_trl(size, length, n, a.seed, a.trl_checkpointing, p,
                                          a.lora),
                          a.threads)
        else:
            profile_steps(lambda n: run_graphrl(size, length, n, a.seed, a.old_forward, p,
                                              a.lora),
                          a.threads)
        return
    rows = []
    cases = [(p, size, length) for size in a.sizes for length in a.lengths
             for p in a.precisions]
    for precision, size, length in cases:
        res = {k: {"times": [], "cpu_times": [], "rewards": []} for k in ("graphrl", "trl")}
        for _ in range(a.reps):
            for which in ("graphrl", "trl"):
                flag = a.old_forward if which == "graphrl" else a.trl_checkpointing
                r = run(which, size, length, a.steps, a.seed, a.threads, flag,
                        precision, a.lora)
                res[which]["times"] += r["times"][1:]
                res[which]["cpu_times"] += r["cpu_times"][1:]
                res[which]["rewards"].append(r["rewards"])
        g, t = (statistics.median(res[k]["times"]) for k in ("graphrl", "trl"))
        gc, tc = (statistics.median(res[k]["cpu_times"]) for k in ("graphrl", "trl"))
        row = {"precision": precision, "size": size, "response_len": length, "lora": a.lora,
               "steps": a.steps, "reps": a.reps, "threads": a.threads, "graphrl_old_forward": a.old_forward,
               "trl_checkpointing": a.trl_checkpointing,
               "graphrl_s_per_step": round(g, 4), "trl_s_per_step": round(t, 4),
               "speedup": round(t / g, 2),
               # process CPU seconds (1 thread): less sensitive to other load
               "graphrl_cpu_s_per_step": round(gc, 4), "trl_cpu_s_per_step": round(tc, 4),
               "cpu_speedup": round(tc / gc, 2), "load_avg_1min": _load()}
        for k in ("graphrl", "trl"):
            runs = res[k]["rewards"]     # mean over the repetitions, step by step
            rw = [sum(r[i] for r in runs) / len(runs) for i in range(a.steps)]
            row[f"{k}_reward_first5"] = round(sum(rw[:5]) / 5, 3)
            row[f"{k}_reward_last5"] = round(sum(rw[-5:]) / 5, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
