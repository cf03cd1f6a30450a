"""Local Hugging Face directories: load a model's weights and tokenizer, save a trained one.

Never a hub: every load passes `local_files_only=True` and a path that exists. Weights may
be `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` with their index, or
`pytorch_model.bin` (transformers reads all three). A save writes to a temporary directory
beside the target and renames it into place, so a crash never leaves half a checkpoint
under the target's name.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from graphrl.errors import UsageError
from graphrl.hf_dir import TOKENIZER_FILES, check_model_dir


def load_hf_module(path: str, head: str, adjust: Callable[[Any], Any], auto_cls: Any) -> Any:
    """The module of the directory at `path` as class `auto_cls`, float32, its config
    passed through `adjust` first. A scalar head the checkpoint lacks starts fresh."""
    import torch
    import transformers

    check_model_dir(path)
    try:
        config = adjust(transformers.AutoConfig.from_pretrained(path, local_files_only=True))
        return auto_cls.from_pretrained(path, config=config, local_files_only=True,
                                        dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"model directory {path}: cannot load it as a {head}-head model: "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved in a model directory (tokenizer.json / vocab files)."""
    import transformers

    check_model_dir(path, need_tokenizer=True)
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"model directory {path}: cannot load its tokenizer: "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class SpecialTokens:
    """A model's end-of-sequence ids, pad id and (if it has one) its tokenizer, which
    turns stop strings into token ids."""

    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    tokenizer: Any = None

    def stop_ids(self, at_eos: bool, extra: Sequence[int] | None, stop: str
                 ) -> list[tuple[int, ...]]:
        """Token-id sequences that end a row: EOS ids, `extra` ids, and `stop` encoded."""
        out = [(i,) for i in (self.eos_ids if at_eos else ())]
        out += [(int(i),) for i in (extra or ())]
        if stop:
            if self.tokenizer is None:
                raise UsageError(f"generate: stop={stop!r} needs the model's tokenizer (load "
                                 "the model from a Hugging Face directory)")
            ids = tuple(self.tokenizer.encode(stop, add_special_tokens=False))
            if not ids:
                raise UsageError(f"generate: stop={stop!r} encodes to no tokens")
            out.append(ids)
        return out


def special_tokens(path: str | None, config: Any) -> SpecialTokens:
    """EOS and pad ids from the directory's generation config, config and tokenizer (in
    that order); a model built in code has its config's (usually none, pad 0)."""
    eos = _ids(getattr(config, "eos_token_id", None))
    pad = getattr(config, "pad_token_id", None)
    tokenizer = None
    if path is not None:
        gen = Path(path) / "generation_config.json"
        if gen.is_file():
            import json

            data = json.loads(gen.read_text())
            eos = _ids(data.get("eos_token_id")) or eos
            pad = data.get("pad_token_id", pad)
        if any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            tokenizer = load_tokenizer(path)
            eos = eos or _ids(tokenizer.eos_token_id)
            pad = pad if pad is not None else tokenizer.pad_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    if pad is None:
        pad = eos[0] if eos else 0
    return SpecialTokens(eos, int(pad), tokenizer)


def save_hf_dir(target: str, module: Any, state: Mapping[str, Any],
                tokenizer_from: str | None = None) -> Path:
    """Write `module` with weights `state` as a Hugging Face directory at `target`
    (config, safetensors weights, the tokenizer files of `tokenizer_from`): written to
    a temporary directory beside it, then renamed into place (an existing target is
    replaced only after the new one is complete)."""
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        module.load_state_dict(dict(state))
        module.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_from is not None:
            load_tokenizer(tokenizer_from).save_pretrained(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
