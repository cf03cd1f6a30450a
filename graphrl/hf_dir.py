"""What a local Hugging Face model directory must hold, checked without torch.

The compiler plans from `config.json` alone; engines load the weights and the tokenizer
(backends/engines/hf_checkpoint.py). Checking here first turns a wrong path into one clear
error instead of a deep transformers traceback or, worse, a hub lookup.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UsageError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def is_model_dir(value: Any) -> bool:
    """Whether a Model's config names a directory (a str or Path) rather than a config."""
    return isinstance(value, (str, Path))


def check_model_dir(path: str | Path, need_tokenizer: bool = False,
                    read: bool = True) -> Path:
    """`path` if it holds a config.json and weights (and tokenizer files if asked), and
    (`read`) a config graphrl.model_config reads; UsageError saying what is wrong."""
    d = Path(path)
    if not d.is_dir():
        raise UsageError(f"model directory {path}: "
                         f"{'is a file' if d.exists() else 'does not exist'} (graphrl loads "
                         "models from local Hugging Face directories only, never a hub)")
    if not (d / "config.json").is_file():
        raise UsageError(f"model directory {path}: no config.json")
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise UsageError(f"model directory {path}: no weights (expected one of "
                         f"{', '.join(WEIGHT_FILES)})")
    if need_tokenizer and not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"model directory {path}: no tokenizer files (expected one of "
                         f"{', '.join(TOKENIZER_FILES)})")
    if read:
        read_config(d)   # before transformers reads it: a bad field is named, not a traceback
    return d


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a model directory, checked (graphrl.model_config), as a dict."""
    from .model_config import load_hf_config

    d = Path(path)
    if not (d / "config.json").is_file():
        check_model_dir(d)   # says what is wrong with the directory
    try:
        return dict(load_hf_config(str(d / "config.json")))
    except ValueError as e:
        raise UsageError(f"model directory {path}: {e}") from None
