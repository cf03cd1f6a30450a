"""Local Hugging Face directories: load a model's weights and tokenizer, save a trained one.

Never a hub: every load passes `local_files_only=True` and a path that exists. Weights may
be `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` with their index, or
`pytorch_model.bin` (transformers reads all three). A save writes to a temporary directory
beside the target and renames it into place, so a crash never leaves half a checkpoint
under the target's name.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from graphrl.errors import UsageError
from graphrl.hf_dir import TOKENIZER_FILES, check_model_dir

from .hf_classes import hf_class, inference_config


@contextlib.contextmanager
def no_progress_bars():
    """transformers' own progress bars (loading / writing shards) off while inside: a
    graphrl run shows one progress bar, its own."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def load_hf_module(path: str, head: str, adjust: Callable[[Any], Any], auto_cls: Any,
                   model: str = "", engine: str = "hf") -> Any:
    """The module of the directory at `path` as class `auto_cls`, float32, its config
    passed through `adjust` first. A scalar head the checkpoint lacks starts fresh; any
    other tensor the config implies must be there with its shape (check_weights)."""
    import torch
    import transformers

    check_model_dir(path)
    try:
        config = adjust(transformers.AutoConfig.from_pretrained(path, local_files_only=True))
        check_weights(path, config, auto_cls, model, engine)
        with no_progress_bars():
            module = auto_cls.from_pretrained(path, config=config, local_files_only=True,
                                              dtype=torch.float32)
        check_finite_weights(path, module)
        return module
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"model directory {path}: cannot load it as a {head}-head model: "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None


def checkpoint_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name -> (shape, file) of the weights in a model directory, read from the
    safetensors headers (nothing loaded) or a memory-mapped pytorch_model.bin."""
    import json

    import torch
    from safetensors import safe_open

    d = Path(path)
    index = next((d / f for f in ("model.safetensors.index.json",
                                  "pytorch_model.bin.index.json") if (d / f).is_file()), None)
    if index is not None:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if (d / f).is_file()][:1]
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        try:
            if f.endswith(".safetensors"):
                with safe_open(str(d / f), framework="pt") as fh:
                    for k in fh.keys():
                        out[k] = (tuple(fh.get_slice(k).get_shape()), f)
            else:
                out.update({k: (tuple(v.shape), f) for k, v in _load_bin(d / f).items()})
        except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip raise many kinds
            first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
            raise UsageError(f"model directory {path}: {f} is not a readable "
                             f"{'safetensors' if f.endswith('.safetensors') else 'PyTorch'} "
                             f"weights file (truncated, corrupt, or a pickle the safe loader "
                             f"refuses): {type(e).__name__}: {first}") from None
    return out


def _load_bin(file: Path) -> Any:
    """A pytorch_model.bin through torch's safe (weights-only) unpickler, memory-mapped
    when its format allows (the legacy format does not)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the unpickler's protocol notes: the error says it
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:
            return torch.load(file, map_location="cpu", weights_only=True)


def check_finite_weights(path: str, module: Any) -> None:
    """UsageError naming the file and tensor when a loaded weight holds NaN or inf (one
    isfinite reduction per tensor): such a model would train silently to nonsense."""
    import torch

    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found = checkpoint_shapes(path)
            prefix = module.base_model_prefix + "."
            file = (found.get(name) or found.get(name.removeprefix(prefix)) or
                    ((), "its weights"))[1]
            bad = int((~torch.isfinite(tensor)).sum())
            raise UsageError(f"model directory {path}: tensor {name} in {file} holds {bad} "
                             f"non-finite value{'s' * (bad > 1)} (NaN or inf)")


# buffers older checkpoints saved (GPT-2's causal masks, rotary frequencies): not weights
_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def check_weights(path: str, config: Any, auto_cls: Any, model: str = "",
                  engine: str = "hf") -> None:
    """UsageError unless the weights in `path` hold every parameter the config implies for
    class `auto_cls` with its shape (a fresh scalar head excepted), and no layer the config
    lacks: a config that disagrees with its weights is never half random-initialised."""
    import re

    import torch

    with torch.device("meta"):
        module = auto_cls.from_config(config)
    expected = {k: tuple(v.shape) for k, v in module.named_parameters()}  # tied: once
    found = checkpoint_shapes(path)
    prefix = module.base_model_prefix + "."
    if found and not any(k.startswith(prefix) for k in found):   # a bare base model
        found = {prefix + k: v for k, v in found.items()}
    who = f"model {model}, engine {engine}" if model else f"engine {engine}"
    for name, shape in expected.items():
        if name in found and found[name][0] != shape:
            raise UsageError(f"model directory {path} ({who}): tensor {name} in "
                             f"{found[name][1]} has shape {list(found[name][0])}, but "
                             f"config.json implies {list(shape)}")
    layer = re.compile(r"\.(?:layers|h)\.(\d+)\.")
    held = {int(m.group(1)) for k in found for m in [layer.search(k)] if m}
    layers_field = "n_layer" if hasattr(config, "n_layer") else "num_hidden_layers"
    missing = [k for k in expected if k not in found
               and not k.startswith(("score.", "classifier."))]   # a fresh scalar head
    if missing:
        m = layer.search(missing[0])
        why = (f" ({layers_field}={config.num_hidden_layers} but the weights hold "
               f"{len(held)} layers)" if m and int(m.group(1)) not in held else "")
        raise UsageError(f"model directory {path} ({who}): config.json implies tensor "
                         f"{missing[0]}{why}, which the weights do not hold "
                         f"({len(missing)} tensor{'s' * (len(missing) > 1)} missing)")
    extra = sorted((k for k in found if k.startswith(prefix) and k not in expected
                    and not k.endswith(_BUFFERS)),
                   key=lambda k: (len(k), k))
    if extra:
        raise UsageError(f"model directory {path} ({who}): the weights hold tensor "
                         f"{extra[0]} ({found[extra[0]][1]}), which config.json does not "
                         f"imply (e.g. {layers_field}={config.num_hidden_layers} is fewer "
                         f"layers than the weights hold); {len(extra)} such tensors")


def check_checkpoints(models: Mapping[str, Any], graph: Any) -> None:
    """check_weights for every model of a run loaded from a directory, on the driver
    before any worker starts; the engine named is the one of its forward/train calls
    (else its generate call) as graphrl.engines.resolve_engines gives it."""
    import transformers

    from graphrl.engines import resolve_engines

    resolved = resolve_engines(graph, {name: m.engine for name, m in models.items()})
    for name, m in sorted(models.items()):
        if m.checkpoint is None:
            continue
        calls = sorted((n.target == "generate", engine) for n in graph.nodes
                       for engine in [resolved.get(n.name)] if engine and n.model == name)
        engine = calls[0][1] if calls else m.engine
        config = inference_config(transformers.AutoConfig.from_pretrained(
            m.checkpoint, local_files_only=True), m.head)
        check_weights(m.checkpoint, config, hf_class(m.spec, auto=True), name, engine)


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


def empty_module(decl: Any, checkpoint: str | None) -> Any:
    """The HF module of `decl` (its checkpoint's config, else its spec) on the meta
    device: the shape to save weights into, nothing allocated."""
    import torch
    import transformers

    head = decl.spec.head
    if checkpoint is None:
        config = decl.spec.hf_config()
        cls = hf_class(decl.spec)
    else:
        config = transformers.AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        cls = hf_class(decl.spec, auto=True)
    if head != "lm":
        config.num_labels = 1
    with torch.device("meta"):   # a concrete class is built directly (it has no from_config)
        return cls.from_config(config) if checkpoint is not None else cls(config)


def _write_model(directory: Path, module: Any, state: Mapping[str, Any]) -> None:
    module.load_state_dict(dict(state), assign=True)
    if getattr(module.config, "tie_word_embeddings", False):
        module.tie_weights()
    with no_progress_bars():
        module.save_pretrained(directory, safe_serialization=True)


def save_models(target: str, models: Sequence[tuple[str, Any, Mapping[str, Any]]],
                tokenizer_from: str | None = None) -> Path:
    """Write trained models as Hugging Face directories: `models` are (subdirectory,
    module, weights), "" for the target itself (the policy: `from_pretrained(target)`
    loads it), e.g. "critic" beside it; the tokenizer of `tokenizer_from` is copied into
    each. Written to a temporary directory beside `target`, then renamed into place (an
    existing target is replaced only once the new one is complete)."""
    out = Path(target)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--save {target}: is a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = load_tokenizer(tokenizer_from) if tokenizer_from else None
        for sub, module, state in models:
            directory = tmp / sub if sub else tmp
            _write_model(directory, module, state)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_trained(target: str, models: Mapping[str, Any], export: Callable[[str], Any],
                 tokenizer_from: str | None = None) -> list[str]:
    """Save every trainable model of a run (graphrl.Model by name): the policy (lm head)
    at `target`, any other (a critic) in `target/<name>`. `export(name)` gives a
    model's full weights. Returns the directories written."""
    chosen = [m for m in models.values() if m.trainable]
    if not chosen:
        raise UsageError("--save: no model of this run trains")
    policy = next((m for m in chosen if m.head == "lm"), None)
    entries, written = [], []
    for m in chosen:
        sub = "" if m is policy else m.name
        entries.append((sub, empty_module(m.decl(), m.checkpoint), export(m.name)))
        written.append(str(Path(target) / sub) if sub else target)
    save_models(target, entries, tokenizer_from)
    return written


def publish_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out` by renames: a reader sees the earlier
    output or the whole new one, never a half-written one."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
