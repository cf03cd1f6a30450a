"""What defines a run, for resuming it: the settings a checkpoint records (run.json
`settings`) and a resumed run must repeat, named by their command-line flags.

Two kinds of settings:
- decisive: the value itself decides what the run computes (--seed, the contents of the
  --data, --eval-data, --reward and --loss files, the reward and loss functions,
  --staleness, --eval-threshold, each model's precision and architecture); any change
  is refused.
- explaining: a flag whose effect shows in the step's graph, the next iteration's inputs
  or the models' shapes (--batch-size, --prompt-len, --response-len, --model,
  --model-config, --prompt-field, --chat-template, --eval-every, --eval-samples,
  --eval-greedy). Leaving it out or spelling out the example's default, or moving a
  model directory, changes nothing and is accepted; when the graph or the data differ,
  these flags are named as the cause.

--iterations is not a setting: a finished run resumed with more iterations continues it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

DECISIVE = ("--seed", "--data", "--reward", "--staleness", "--precision", "models",
            "--eval-data", "--eval-threshold", "--loss")
EXPLAINING = ("--batch-size", "--prompt-len", "--response-len", "--model", "--model-config",
              "--prompt-field", "--chat-template", "--eval-every", "--eval-samples",
              "--eval-greedy")
_MODEL_LINE = re.compile(r"^\s*model (\S+) = (\w+\{[^}]*\})")


def run_settings(opts: Any, program: Any) -> dict[str, Any]:
    """The settings of this run (JSON values), keyed by flag."""
    text = program.graph.text()
    return {
        "--seed": opts.seed,
        "--data": _file_identity(opts.data),
        "--reward": _function_identity(opts.reward),
        "--loss": _function_identity(getattr(opts, "loss", None)),
        "--staleness": opts.staleness,
        "--precision": ",".join(f"{name}={dtype}" for name, dtype in
                                sorted(precisions(text).items())),
        "models": architectures(text),
        "--batch-size": opts.batch_size,
        "--prompt-len": opts.prompt_len,
        "--response-len": opts.response_len,
        "--model": ",".join(f"{r}={p}" for r, p in opts.model_dirs) or None,
        "--model-config": ",".join(f"{r}={p}" for r, p in opts.model_config) or None,
        "--prompt-field": opts.prompt_field,
        "--chat-template": opts.chat_template,
        "--eval-data": _file_identity(opts.eval_data),
        "--eval-threshold": opts.eval_threshold,
        "--eval-every": opts.eval_every,
        "--eval-samples": opts.eval_samples,
        "--eval-greedy": opts.eval_greedy,
    }


def architectures(graph_text: str) -> dict[str, str]:
    """Model -> its architecture as the graph's model line prints it (`llama{vocab=16,
    ...}`), without its dtype (precision is a setting of its own) and without what
    follows the braces (the engine may change: a checkpoint loads into any engine)."""
    return {name: re.sub(r", dtype=\w+", "", arch) for name, arch in _models(graph_text)}


def precisions(graph_text: str) -> dict[str, str]:
    """Model -> the precision it runs in (its model line's dtype)."""
    return {name: (re.search(r"dtype=(\w+)", arch) or [None, "?"])[1]
            for name, arch in _models(graph_text)}


def _models(graph_text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in map(_MODEL_LINE.match, graph_text.splitlines())
            if m]


def _file_identity(path: str | None) -> dict[str, str] | None:
    """A file by its contents (sha256) and, for the message, its path."""
    if not path or not Path(path).is_file():
        return None if not path else {"path": path, "sha256": "missing"}
    from .checkpoint import sha256_file

    return {"path": path, "sha256": sha256_file(Path(path))[:16]}


def _function_identity(spec: str | None) -> dict[str, Any] | None:
    """--reward/--loss FILE.py:NAME: the function's name and the file's contents."""
    if not spec:
        return None
    path, _, name = spec.rpartition(":")
    return {"function": name, **(_file_identity(path) or {"path": path})}


def _show(value: Any) -> str:
    if value is None:
        return "not given"
    if isinstance(value, dict) and "sha256" in value:
        what = f"{value['path']} (sha256 {value['sha256']})"
        return f"{value['function']} in {what}" if "function" in value else what
    return str(value)


def _same(flag: str, a: Any, b: Any) -> bool:
    if flag in ("--data", "--eval-data", "--reward", "--loss") and a and b:   # by contents: the file may move
        return ({k: v for k, v in a.items() if k != "path"}
                == {k: v for k, v in b.items() if k != "path"})
    return a == b


def differences(theirs: Mapping[str, Any], ours: Mapping[str, Any],
                flags: tuple[str, ...]) -> list[str]:
    """'FLAG: checkpoint X, this run Y' for each of `flags` whose value differs (a flag the
    checkpoint does not record is not compared)."""
    out = []
    for flag in flags:
        if flag not in theirs or _same(flag, theirs[flag], ours.get(flag)):
            continue
        if flag == "models":
            a, b = theirs[flag], ours.get(flag, {})
            out += [f"model {m}: checkpoint {a.get(m, 'none')}, this run {b.get(m, 'none')}"
                    for m in sorted(set(a) | set(b)) if a.get(m) != b.get(m)]
        else:
            out.append(f"{flag}: checkpoint {_show(theirs[flag])}, "
                       f"this run {_show(ours.get(flag))}")
    return out


__all__ = ["run_settings", "differences", "architectures", "DECISIVE", "EXPLAINING"]
