"""An Experiment bundles what an example defines: its models, step, data and reward.

Examples expose `build(options) -> Experiment`; `graphrl run` and `python examples/X.py`
both go through it. RunOptions are the options every example takes, as plain typed
fields (the command line fills them: graphrl/cli/run_args.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import UsageError
from .option_checks import BACKENDS, check_run_options
from .trace import Model, Program, trace
from .types import PayloadSpec


@dataclass(frozen=True)
class RunOptions:
    iterations: int | None = None  # None: the example's default
    seed: int = 0
    metrics: str | None = None
    trace: str | None = None
    device: str = "cpu"
    batch_size: int | None = None
    quiet: bool = False
    model_size: str | None = None        # "7b" for every model, or "policy=70b,reward=7b"
    model_config: tuple[tuple[str, str], ...] = ()  # (role, HF config.json path)
    prompt_len: int | None = None
    response_len: int | None = None
    backend: str = "local"               # local | ray
    cluster: str | None = None           # ray: NxGxTYPE (default 1x4xcpu)
    policy: str | None = None            # ray: placement policy (default auto)
    placement: str | None = None         # ray: placement file pinning calls
    address: str | None = None           # ray: join this cluster instead of starting one
    model_dirs: tuple[tuple[str, str], ...] = ()    # (role, local HF model directory)
    data: str | None = None              # prompts file (JSONL or Parquet)
    prompt_field: str = "prompt"
    chat_template: bool = False
    save: str | None = None              # write the trained models here (HF directories)
    reward: str | None = None            # FILE.py:FUNCTION, a reward over text
    reward_timeout: float | None = None  # seconds one reward call may take (None: 60)
    loss: str | None = None              # FILE.py:NAME, a @graphrl.loss for the policy
    run_dir: str | None = None           # the run directory (graphrl.run_dir); examples
                                         # write what they generate there (default runs/)
    overwrite: bool = False              # --metrics may replace an earlier run's file
    call_timeout: float | None = None    # ray: seconds one wait may take (None: from plan)
    checkpoint_dir: str | None = None    # write checkpoints here (graphrl.checkpoint)
    checkpoint_every: int | None = None  # every N iterations (and at the end)
    keep: int = 2                        # keep the newest K checkpoints
    resume: str | None = None            # a checkpoint, or a --checkpoint-dir (its newest)
    max_restarts: int = 0                # ray: restarts from the last checkpoint on a lost rank
    staleness: int = 0                   # rollouts train K steps after they are generated
    precision: str | None = None         # "fp32" for every model, or "policy=fp32,critic=bf16"
    loggers: tuple[str, ...] = ("jsonl",)  # where metrics rows go (graphrl.loggers)
    config: str | None = None            # the config.json this run reruns (graphrl run --config)
    eval_data: str | None = None         # held-out prompts file (graphrl.evaluation)
    eval_every: int | None = None        # evaluate after every N-th training step
    eval_samples: int = 1                # responses per held-out prompt (pass@k's n)
    eval_greedy: bool = False            # also decode the held-out prompts at temperature 0
    eval_threshold: float = 0.5          # a held-out response is correct if reward >= this
    lora: tuple[str, ...] = ()           # --lora ROLE:r=16,alpha=32,targets=q_proj,v_proj
    save_merged: str | None = None       # --lora run: the merged policy, an HF directory

    @property
    def files_dir(self) -> str:
        """Where an example writes what it generates (a tiny model, a data file): the run
        directory, else runs/."""
        return self.run_dir or "runs"

    def __post_init__(self) -> None:
        check_run_options(self)

    def loras(self) -> dict[str, Any]:
        """Role -> graphrl.LoRA from --lora."""
        from .lora import parse_lora_option

        out = dict(parse_lora_option(text) for text in self.lora)
        if len(out) != len(self.lora):
            raise UsageError(f"--lora: a role is given twice ({', '.join(self.lora)})")
        return out

    def precisions(self) -> dict[str, str]:
        """Role -> precision from --precision ("*" for every role)."""
        from .types import PRECISIONS

        if not self.precision:
            return {}
        out = {}
        for part in (p.strip() for p in self.precision.split(",")):
            role, sep, value = part.rpartition("=")
            if not value or (sep and not role):
                raise UsageError(f"--precision {self.precision}: expected PRECISION or "
                                 "ROLE=PRECISION[,ROLE=PRECISION...], e.g. fp32 or "
                                 "policy=fp32,reward=bf16")
            if value not in PRECISIONS:
                raise UsageError(f"--precision {self.precision}: unknown precision "
                                 f"{value!r}{f' for {role}' if role else ''} (allowed: "
                                 f"{', '.join(PRECISIONS)})")
            out[role or "*"] = value
        return out

    def sizes(self) -> dict[str, str]:
        """Role -> Llama-2 preset size from --model-size ("*" for every role)."""
        if not self.model_size:
            return {}
        out = {}
        for part in (p.strip() for p in self.model_size.split(",")):
            role, sep, size = part.rpartition("=")
            if not size or (sep and not role):
                raise UsageError(f"--model-size {self.model_size}: expected SIZE or "
                                 "ROLE=SIZE[,ROLE=SIZE...], e.g. policy=70b,reward=7b")
            out[role or "*"] = size
        return out

    def config_for(self, role: str, default: Any) -> Any:
        """The config a role's model uses: --model ROLE=DIR (a local Hugging Face model
        directory; a bare --model DIR is the policy's), else --model-config ROLE=FILE, else --model-size, else the example's
        default."""
        from .model_config import load_hf_config
        from .types import llama2

        dirs = dict(self.model_dirs)
        if role in dirs:
            return dirs[role]
        configs = dict(self.model_config)
        if role in configs:
            try:
                return dict(load_hf_config(configs[role]))
            except ValueError as e:
                raise UsageError(f"--model-config {role}={e}") from None
        sizes = self.sizes()
        size = sizes.get(role, sizes.get("*"))
        if size is None:
            return default
        try:
            return llama2(size)
        except ValueError as e:
            raise UsageError(f"--model-size: {e}") from None

    def model_dir(self, role: str) -> str | None:
        """The --model directory given for `role`, if any."""
        return dict(self.model_dirs).get(role)

    @property
    def planning_only(self) -> bool:
        """Full-size models: the graph is for compiling, too large to run here."""
        return bool(self.model_size or self.model_config)


@dataclass(frozen=True)
class Experiment:
    """name: the step's name; data(iteration) gives that iteration's input payloads;
    reward: the graph output (a Scores payload in [0, 1]) reported as reward_mean;
    prepare(engines) runs once before RL (e.g. reward-model training) and returns
    metrics to report; evaluation: held-out prompts scored every N iterations inside
    the step's graph (graphrl.evaluation)."""

    name: str
    step: Callable[..., Any]
    models: tuple[Model, ...]
    inputs: Mapping[str, PayloadSpec]
    data: Callable[[int], Mapping[str, Any]]
    reward: str
    iterations: int = 30
    prepare: Callable[[Mapping[str, Any]], Mapping[str, float]] | None = None
    description: str = ""
    notes: Mapping[str, Any] = field(default_factory=dict)
    evaluation: Any = None   # graphrl.evaluation.Evaluation

    def __post_init__(self) -> None:
        where = f"Experiment {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise UsageError(f"{where}: name must be a Python identifier")
        for what in ("step", "data"):
            if not callable(getattr(self, what)):
                raise UsageError(f"{where}: {what} must be callable")
        if self.prepare is not None and not callable(self.prepare):
            raise UsageError(f"{where}: prepare must be callable or None")
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise UsageError(f"{where}: iterations={it!r} must be an int >= 1")
        if not all(isinstance(m, Model) for m in self.models):
            raise UsageError(f"{where}: models must be graphrl.Model declarations")

    def program(self, staleness: int = 0) -> Program:
        """The traced step (with its eval step merged in when it evaluates); staleness
        K >= 1: rewritten so that rollouts train K steps after they are generated
        (graphrl.passes.staleness)."""
        program = trace(self.step, list(self.models), name=self.name, **self.inputs)
        if self.evaluation is not None:
            from .evaluation import add_evaluation

            program = add_evaluation(program, self.evaluation)
        if staleness:
            from dataclasses import replace

            from graphrl.passes.staleness import carry_rollouts, verify_staleness

            graph = verify_staleness(carry_rollouts(program.graph, staleness), staleness)
            program = replace(program, graph=graph)
        return program

    def step_inputs(self, iteration: int) -> dict[str, Any]:
        """The inputs of step `iteration`: its data, and the held-out prompts when the
        experiment evaluates."""
        extra = self.evaluation.inputs() if self.evaluation is not None else {}
        return {**self.data(iteration), **extra}

    def with_precision(self, opts: RunOptions) -> "Experiment":
        """The experiment with --precision applied to its models (each named role, or
        every model for a bare PRECISION), and --lora's adapters (graphrl.lora.apply_lora);
        unchanged without them."""
        from dataclasses import replace

        loras = opts.loras()
        if loras:   # --lora: adapters on the named models (graphrl.lora)
            from dataclasses import replace

            from .lora import apply_lora

            self.check_roles(opts)
            self = replace(self, models=apply_lora(self.models, loras))
        given = opts.precisions()
        if not given:
            return self
        self.check_roles(opts)
        models = tuple(replace(m, precision=given.get(m.name, given.get("*", m.precision)))
                       for m in self.models)
        return replace(self, models=models)

    def check_roles(self, opts: RunOptions) -> None:
        """Every role named by --model/--model-config/--model-size/--precision is a model
        here."""
        from .nearest import suggest

        names = [m.name for m in self.models]
        given = [("--model", r) for r, _ in opts.model_dirs] + \
                [("--model-config", r) for r, _ in opts.model_config] + \
                [("--model-size", r) for r in opts.sizes() if r != "*"] + \
                [("--precision", r) for r in opts.precisions() if r != "*"] + \
                [("--lora", r) for r in opts.loras()]
        for flag, role in given:
            if role not in names:
                raise UsageError(f"{flag}: {self.name} has no model {role!r}"
                                 f"{suggest(role, names)} (its models: {', '.join(names)})")

