"""The command-line flags of every example run (`graphrl run/show/compile/compare` and
`python examples/X.py`), parsed into the core's plain RunOptions (graphrl.experiment).
Command-line side: nothing in the core imports this module."""
from __future__ import annotations

import argparse

from ..async_cost import MAX_STALENESS
from ..errors import UsageError
from ..experiment import BACKENDS, RunOptions
from ..option_checks import MAX_BATCH, MAX_SEED
from .argtypes import int_at_least, positive_int, positive_seconds
from .eval_args import add_eval_options, eval_fields


def add_run_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    """The options of every example run; `backend` adds --backend and the Ray options
    (commands that compile take --cluster/--policy/--placement themselves)."""
    if backend:
        add_backend_options(p)
        add_checkpoint_options(p)
        add_logger_options(p)
    p.add_argument("--iterations", type=positive_int, metavar="N",
                   help="RL iterations to run (default: the example's own, e.g. 30)")
    p.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0,
                   help=f"random seed, 0 to {MAX_SEED} (default 0)")
    p.add_argument("--metrics", metavar="FILE",
                   help="write one JSON line per iteration (iteration, reward_mean, "
                        "step_seconds, seconds per call, losses)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --metrics replace an existing file, --save a non-empty "
                        "directory, and --run-dir a folder holding an earlier run (refused "
                        "otherwise)")
    p.add_argument("--trace", metavar="FILE",
                   help="write the measured timeline as Chrome trace JSON (open in "
                        "ui.perfetto.dev)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the models run (default cpu)")
    p.add_argument("--batch-size", type=int_at_least(1, MAX_BATCH), metavar="B",
                   help=f"prompts per iteration (default: the example's own; at most "
                        f"{MAX_BATCH})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--model-size", metavar="SIZES",
                   help="plan with Llama-2-shaped models: 7b|13b|34b|70b for every model, "
                        "or per role, e.g. policy=70b,reward=7b (roles: policy, reference, "
                        "reward, critic)")
    p.add_argument("--precision", metavar="PRECISION",
                   help="bf16 (default: bf16 mixed precision, fp32 master weights and Adam "
                        "state) or fp32, for every model, or per role, e.g. "
                        "policy=fp32,critic=fp32; the plan prices and every engine runs it")
    p.add_argument("--lora", metavar="ROLE[:r=R,alpha=A,targets=M1,M2,...]", action="append",
                   default=[],
                   help="train LoRA adapters of ROLE instead of its weights (repeatable), e.g. "
                        "policy:r=16,alpha=32,targets=q_proj,v_proj (defaults r=16, alpha=32, "
                        "targets q_proj,v_proj (gpt2: c_attn), dropout=0; adapter=DIR continues "
                        "a PEFT adapter); a reference starting as ROLE then shares its frozen "
                        "base (docs/lora.md)")
    p.add_argument("--model-config", metavar="ROLE=CONFIG.json", action="append", default=[],
                   help="a Hugging Face config file for one role (repeatable)")
    p.add_argument("--model", metavar="[ROLE=]DIR", action="append", default=[],
                   dest="model_dirs",
                   help="a local Hugging Face model directory (config.json, weights, "
                        "tokenizer): DIR alone is the policy (and the reference, which "
                        "starts as a copy of it), ROLE=DIR another role, e.g. "
                        "reward=./my-rm (repeatable; compile plans its real shapes; never "
                        "downloads)")
    p.add_argument("--data", metavar="FILE",
                   help="prompts file: JSONL (one JSON object per line) or Parquet, for "
                        "examples that read text prompts")
    p.add_argument("--prompt-field", default="prompt", metavar="NAME",
                   help="the field of each data row holding the prompt (default prompt)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--reward", metavar="FILE.py:FUNCTION",
                   help="a reward function over text, def f(prompt, response, **row_fields) "
                        "-> float, for examples that score text (FILE runs as Python)")
    p.add_argument("--reward-timeout", type=positive_seconds, metavar="SECONDS",
                   help="the longest one call of the reward function may take before the "
                        "run stops with an error naming it and the data row (default 60)")
    p.add_argument("--loss", metavar="FILE.py:NAME",
                   help="the policy loss: a loss declared with @graphrl.loss in FILE (FILE "
                        "runs as Python), for examples that take one (grpo.py, gspo.py; "
                        "docs/algorithms.md)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="a folder holding the whole run: config.json (every option, model "
                        "and data hashes, versions, the plan; rerun it with graphrl run "
                        "--config DIR/config.json), metrics.jsonl, trace.json, "
                        "checkpoints/, save/ and the logger folders, unless those are given "
                        "elsewhere; a DIR holding a run is refused unless --overwrite or "
                        "--resume. Examples write what they generate (tiny default model, "
                        "data file) there too (default runs/)")
    p.add_argument("--save", metavar="DIR",
                   help="after the run, write the trained policy as a Hugging Face "
                        "directory (tokenizer copied beside it; a critic in DIR/critic), "
                        "atomically")
    p.add_argument("--save-merged", metavar="DIR",
                   help="after a --lora run, also write the policy with its adapters merged "
                        "(W + alpha/r B A) as a plain Hugging Face directory, atomically")
    p.add_argument("--staleness", type=int_at_least(0, MAX_STALENESS), default=0,
                   metavar="K",
                   help="asynchronous off-policy steps: rollouts generated at step n train "
                        "at step n+K, so generation overlaps training (default 0: "
                        f"synchronous; at most {MAX_STALENESS}); the policy loss becomes its "
                        "staleness-corrected form")
    p.add_argument("--prompt-len", type=positive_int, metavar="P",
                   help="prompt tokens (default: the example's task)")
    p.add_argument("--response-len", type=positive_int, metavar="R",
                   help="generated tokens per response (default: the example's task)")
    add_eval_options(p)


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """--checkpoint-dir/--checkpoint-every/--keep/--resume/--max-restarts (runs only)."""
    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write checkpoints (weights, optimizer state, RNG states, data "
                        "position, metrics) into DIR, each published atomically")
    c.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="a checkpoint every N iterations (default: only at the end)")
    c.add_argument("--keep", type=positive_int, default=2, metavar="K",
                   help="keep the newest K checkpoints (default 2)")
    c.add_argument("--resume", metavar="DIR",
                   help="continue from a checkpoint directory, or from the newest valid "
                        "one in a --checkpoint-dir; the run continues exactly (the same "
                        "settings: a changed --seed, --batch-size, --data, ... is refused "
                        "naming it); a larger --iterations extends a finished run")
    c.add_argument("--max-restarts", type=int_at_least(0), default=0, metavar="R",
                   help="ray: when a worker dies, restart the workers from the last "
                        "checkpoint, at most R times (needs --checkpoint-dir)")


def add_logger_options(p: argparse.ArgumentParser) -> None:
    """--logger (runs only)."""
    from ..loggers import DEFAULT_LOGGERS

    p.add_argument("--logger", dest="loggers", type=logger_names,
                   default=DEFAULT_LOGGERS, metavar="NAMES",
                   help="where each iteration's metrics go, any of jsonl,tensorboard,wandb "
                        "(default jsonl: the --metrics file, DIR/metrics.jsonl with "
                        "--run-dir); tensorboard writes event files to DIR/tensorboard, "
                        "wandb an offline W&B run to DIR/wandb (upload later with wandb "
                        "sync), both with the run's configuration; they need --run-dir and "
                        "pip install 'graphrl[loggers]'")


def logger_names(text: str) -> tuple[str, ...]:
    from ..loggers import parse_loggers

    try:
        return parse_loggers(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2] or str(e)) from None


def add_backend_options(p: argparse.ArgumentParser) -> None:
    from ..placement_file import POLICY_NAMES

    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=BACKENDS, default="local",
                   help="local: one process (default); ray: compile the step for --cluster "
                        "and run the plan on Ray, one actor per GPU")
    g.add_argument("--cluster", metavar="NxGxTYPE",
                   help="ray: the cluster to compile for and start, e.g. 1x4xcpu (default; "
                        "fake GPUs on CPU) or 2x8xH100")
    g.add_argument("--policy", choices=POLICY_NAMES,
                   help="ray: placement policy (default auto)")
    g.add_argument("--placement", metavar="FILE",
                   help="ray: pin calls (YAML or JSON), e.g. "
                        "'policy.train: {gpus: \"0-1\", dp: 2, zero: 3}'")
    g.add_argument("--address", metavar="ADDR",
                   help="ray: join the Ray cluster at ADDR (e.g. auto, or host:6379 after "
                        "`ray start --head`) instead of starting a local one")
    g.add_argument("--call-timeout", type=positive_seconds, metavar="SECONDS",
                   help="ray: the longest one wait on a worker may take (default: 10x the "
                        "plan's longest predicted call, at least 120 s)")


def _role_paths(items: list[str], flag: str = "--model-config", what: str = "CONFIG.json",
                bare: str | None = None) -> tuple[tuple[str, str], ...]:
    """ROLE=PATH items; with `bare` a PATH alone (no '=', or an existing directory whose
    name has one) is `bare`=PATH."""
    from pathlib import Path

    out = []
    for item in items:
        role, sep, path = item.partition("=")
        if bare and (not sep or Path(item).is_dir()):
            role, sep, path = bare, "=", item
        if not sep or not role or not path:
            raise UsageError(f"{flag} expects ROLE={what}, got {item!r}")
        out.append((role, path))
    return tuple(out)


def run_options(ns: argparse.Namespace) -> RunOptions:
    backend = getattr(ns, "backend", None) or "local"
    ray_opts = {k: getattr(ns, k, None)
                for k in ("cluster", "policy", "placement", "address", "call_timeout")}
    if backend == "local" and hasattr(ns, "backend"):
        given = [f"--{k.replace('_', '-')}" for k, v in ray_opts.items() if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to "
                             "--backend ray")
    return RunOptions(ns.iterations, ns.seed, ns.metrics, ns.trace, ns.device, ns.batch_size,
                      ns.quiet, ns.model_size, _role_paths(ns.model_config), ns.prompt_len,
                      ns.response_len, backend=backend, overwrite=ns.overwrite,
                      model_dirs=_role_paths(getattr(ns, "model_dirs", []), "--model", "DIR",
                                             bare="policy"),
                      data=getattr(ns, "data", None),
                      prompt_field=getattr(ns, "prompt_field", "prompt"),
                      chat_template=getattr(ns, "chat_template", False),
                      save=getattr(ns, "save", None), reward=getattr(ns, "reward", None),
                      reward_timeout=getattr(ns, "reward_timeout", None),
                      loss=getattr(ns, "loss", None),
                      run_dir=getattr(ns, "run_dir", None),
                      loggers=getattr(ns, "loggers", ("jsonl",)),
                      checkpoint_dir=getattr(ns, "checkpoint_dir", None),
                      checkpoint_every=getattr(ns, "checkpoint_every", None),
                      keep=getattr(ns, "keep", 2), resume=getattr(ns, "resume", None),
                      max_restarts=getattr(ns, "max_restarts", 0),
                      staleness=getattr(ns, "staleness", 0) or 0,
                      precision=getattr(ns, "precision", None), **eval_fields(ns),
                      lora=tuple(getattr(ns, "lora", None) or ()),
                      save_merged=getattr(ns, "save_merged", None),
                      **(ray_opts if backend == "ray" else {}))
