"""What a run directory's config.json records, and how a rerun checks it.

`run_record` gathers, for one run: every RunOptions field as given (paths made
absolute: a rerun from another folder finds the same files) and as resolved (the
example's iteration count, --run-dir's default paths), the example file and its sha256,
each model (its directory and the sha256 of its config.json, or the spec it was built
from in code), the sha256 of every input file (data, reward, --model-config,
--placement), the versions of graphrl, Python and the libraries, the git commit of
graphrl's checkout, and the plan's summary (backend, devices, placement, predicted
step). `load_record` reads one back (graphrl.cli.run_config turns it into RunOptions);
`check_inputs` refuses, naming the file, a recorded file whose content changed since.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import UsageError

if TYPE_CHECKING:
    from .experiment import RunOptions

FORMAT = "graphrl-run/1"
CONFIG_FILE = "config.json"
LIBRARIES = ("torch", "transformers", "ray", "tokenizers", "numpy", "tensorboard", "wandb",
             "deepspeed", "megatron-core", "peft")
PATH_FIELDS = ("metrics", "trace", "data", "save", "save_merged", "run_dir", "checkpoint_dir",
               "resume", "placement", "config")
GIT_TIMEOUT_S = 5.0


def sha256_file(path: str | Path) -> str:
    from .checkpoint import sha256_file as digest

    return digest(Path(path))


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def options_record(opts: RunOptions) -> dict[str, Any]:
    """Every RunOptions field as JSON, its paths absolute."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name in PATH_FIELDS and value:
            value = _absolute(value)
        elif f.name in ("model_dirs", "model_config"):
            value = [[role, _absolute(path)] for role, path in value]
        elif f.name in ("reward", "loss") and value:
            file, sep, fn = value.rpartition(":")
            value = f"{_absolute(file)}:{fn}" if sep else value
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def load_record(path: str) -> dict[str, Any]:
    """A run directory's config.json (or the directory itself), checked for its format."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: not JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UsageError(f"--config {path}: not a graphrl run's config.json (expected "
                         f"\"format\": \"{FORMAT}\")")
    return record


def model_record(model: Any) -> dict[str, Any]:
    """A model: its directory and config.json sha256, or (built in code) its spec."""
    out: dict[str, Any] = {"role": model.role, "trainable": model.trainable,
                           "engine": model.engine, "precision": model.precision}
    if model.checkpoint:
        out["dir"] = _absolute(model.checkpoint)
        out["config_sha256"] = sha256_file(Path(model.checkpoint) / "config.json")
    else:
        spec = repr(model.decl().spec)
        out["spec"] = spec
        out["spec_sha256"] = hashlib.sha256(spec.encode()).hexdigest()
    return out


def input_files(opts: RunOptions, notes: Mapping[str, Any]) -> dict[str, str]:
    """What -> path of every input file of the run (its models aside)."""
    files: dict[str, str] = {}
    data = opts.data or notes.get("data")
    if isinstance(data, str) and Path(data).is_file():
        files["data"] = data
    if opts.reward:
        files["reward"] = opts.reward.rpartition(":")[0]
    if opts.loss:
        files["loss"] = opts.loss.rpartition(":")[0]
    for role, path in opts.model_config:
        files[f"model_config:{role}"] = path
    if opts.placement:
        files["placement"] = opts.placement
    return files


def files_record(opts: RunOptions, notes: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    return {what: {"path": _absolute(path), "sha256": sha256_file(path)}
            for what, path in sorted(input_files(opts, notes).items()) if Path(path).is_file()}


def versions() -> dict[str, str]:
    """graphrl, Python and the installed libraries (those present)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for lib in ("graphrl",) + LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_state(folder: Path) -> dict[str, Any] | None:
    """The git commit of `folder`'s checkout and whether it has changes; None outside a
    git checkout (or without git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                                  text=True, timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def plan_summary(executor: Any, opts: RunOptions) -> dict[str, Any]:
    """Backend, device and, where the backend compiled one, the plan: cluster, policy,
    predicted step seconds and where each call runs."""
    out: dict[str, Any] = {"backend": opts.backend, "device": opts.device}
    plan = getattr(executor, "plan", None)
    program = getattr(executor, "program", None)
    if plan is None and program is not None:   # the local backend: every call here, in order
        out["calls"] = [f"{n.name} = {n.target}[{n.model}]" if n.model else
                        f"{n.name} = {n.target}" for n in program.graph.nodes]
    if plan is not None:
        out.update(cluster=plan.cluster.text(), policy=plan.policy,
                   predicted_step_seconds=plan.predicted_step_seconds,
                   placement={n.name: f"{n.target}[{n.model}] {n.placement.text()}"
                              if n.model else f"{n.target} {n.placement.text()}"
                              for n in plan.graph.nodes if n.placement is not None})
    return out


def inputs_record(exp: Any, program: Any, opts: RunOptions) -> dict[str, Any]:
    """What a run reads: its models and input files, with their hashes."""
    return {"models": {name: model_record(m) for name, m in sorted(program.models.items())},
            "files": files_record(opts, exp.notes)}


def run_record(exp: Any, program: Any, given: RunOptions, resolved: RunOptions,
               iterations: int, source: str | None) -> dict[str, Any]:
    """config.json of a run (its "plan" is added once the executor started)."""
    return {"format": FORMAT, "experiment": exp.name,
            "example": ({"path": _absolute(source), "sha256": sha256_file(source)}
                        if source else None),
            "options": options_record(given),
            "resolved": {**options_record(resolved), "iterations": iterations},
            **inputs_record(exp, program, resolved),
            "versions": versions(),
            "git": git_state(Path(__file__).resolve().parent),
            "plan": None}


TIMING_KEYS = ("step_seconds",)


def learning_curve(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row without its wall-clock timings (what a rerun reproduces)."""
    return {k: v for k, v in row.items()
            if k not in TIMING_KEYS and not k.startswith("seconds/")}


def compare_rows(recorded: list[Mapping[str, Any]], rows: list[Mapping[str, Any]]) -> str:
    """One line: whether `rows` reproduce the `recorded` run's rows, timings aside (the
    first difference if not)."""
    n = min(len(recorded), len(rows))
    for old, new in zip(recorded[:n], rows[:n]):
        a, b = learning_curve(old), learning_curve(new)
        if a != b:
            key = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)))
            return (f"differs from the recorded run at iteration {new.get('iteration')}: "
                    f"{key} = {b.get(key)!r}, recorded {a.get(key)!r}")
    return f"{n} iteration(s) equal to the recorded run's (timings aside)"


def check_inputs(record: Mapping[str, Any], now: Mapping[str, Any], where: str,
                 skip: frozenset[str] = frozenset()) -> None:
    """UsageError naming the file when a model config or input file recorded in
    `record` differs in this run (`now`, another run_record); `skip`: the inputs the
    command line replaced on purpose ("data", "models", ...)."""
    old_models, new_models = record.get("models") or {}, now.get("models") or {}
    if "models" not in skip:
        for name, old in sorted(old_models.items()):
            new = new_models.get(name)
            if new is None:
                raise UsageError(f"{where}: the recorded run has a model {name!r}, this "
                                 f"one does not (its models: {', '.join(sorted(new_models))})")
            for key in ("config_sha256", "spec_sha256"):
                if old.get(key) and old.get(key) != new.get(key):
                    what = (f"{new.get('dir')}/config.json" if key == "config_sha256"
                            else f"model {name}'s config (built in code)")
                    raise UsageError(f"{where}: {what} changed since the recorded run "
                                     f"(sha256 {str(new.get(key))[:12]}, recorded "
                                     f"{old[key][:12]})")
    old_files, new_files = record.get("files") or {}, now.get("files") or {}
    for what, old in sorted(old_files.items()):
        if what.split(":")[0] in skip:
            continue
        new = new_files.get(what)
        if new is None:
            raise UsageError(f"{where}: the recorded run read {what} from {old['path']}, "
                             "this one reads none")
        if new["sha256"] != old["sha256"]:
            raise UsageError(f"{where}: {what} file {new['path']} changed since the "
                             f"recorded run (sha256 {new['sha256'][:12]}, recorded "
                             f"{old['sha256'][:12]})")


def check_example(record: Mapping[str, Any], path: str, where: str) -> None:
    """The example file is the one the recorded run built from (same sha256)."""
    old = record.get("example") or {}
    if old.get("sha256") and Path(path).is_file() and sha256_file(path) != old["sha256"]:
        raise UsageError(f"{where}: the example {path} changed since the recorded run "
                         f"(sha256 {sha256_file(path)[:12]}, recorded {old['sha256'][:12]})")


__all__ = ["FORMAT", "CONFIG_FILE", "options_record", "load_record", "inputs_record",
           "run_record", "plan_summary", "learning_curve", "compare_rows", "check_inputs",
           "check_example", "versions", "git_state"]
