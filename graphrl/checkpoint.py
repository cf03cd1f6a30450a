"""Checkpoints on disk: written under a temporary name, published by one rename, verified
before anything is loaded.

A checkpoint is a directory `ckpt-NNNNNNNN` (NNNNNNNN = completed iterations) inside
--checkpoint-dir:

    ckpt-00000004/
      manifest.json     what, which step, which plan; every other file's size and sha256;
                        a sha256 of its own content
      run.json          iteration, settings (graphrl.run_identity), next step and its
                        inputs' fingerprint, metrics rows so far, prepare
      models/...        per model (or per rank and engine on Ray): weights, optimizer,
                        version (torch.save of a state dict)
      rng/...           torch, numpy and python RNG states (per process / rank)

Writing (`CheckpointWriter`): the files go into `.tmp-ckpt-NNNNNNNN-PID/`; each is
fsynced; manifest.json is written LAST (its checksums cover every other file), then the
directory is renamed to its final name (POSIX rename is atomic) and the parent folder
fsynced. A process killed at any moment leaves either the previous checkpoints alone
(a `.tmp-*` directory, removed by the next writer) or the new one complete. Only the
newest `keep` published checkpoints stay.

Reading (`find_checkpoint`, `Checkpoint.verify`): --resume DIR is a checkpoint directory
or a --checkpoint-dir (its newest published checkpoint). The manifest must match its own
sha256 and every file it lists must exist with its size and sha256 (checked first, so
corruption is reported as such), and then the step's graph, the models' parameter
shapes and the seed must match this run: otherwise a UsageError names the file and what
differs, before any state is touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import UsageError

MANIFEST = "manifest.json"
RUN_FILE = "run.json"
SELF_SUM = "manifest_sha256"   # the manifest's checksum of itself (older ones have none)
FORMAT = 1
PREFIX = "ckpt-"
TMP = ".tmp-"
_NAME = re.compile(r"^ckpt-(\d{8})$")
# Test hook: seconds to sleep after each file a checkpoint writes, so that a test's
# SIGKILL lands inside a write (tests/test_checkpoint.py); unset in normal runs.
SLOW_ENV = "GRAPHRL_TEST_CHECKPOINT_FILE_DELAY"


def checkpoint_name(iteration: int) -> str:
    return f"{PREFIX}{iteration:08d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries: a rename inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_written(path: Path) -> None:
    """Call after writing a checkpoint file: fsync it (and the test hook's delay)."""
    fsync_path(path)
    delay = os.environ.get(SLOW_ENV)
    if delay:
        time.sleep(float(delay))


def save_torch(obj: Any, path: Path) -> None:
    """torch.save into a checkpoint (folder made, file fsynced)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    file_written(path)


def load_torch(path: Path) -> Any:
    """A checkpoint file written by save_torch (tensors and plain containers only); a
    file torch cannot read (corrupt behind a matching manifest) or a float tensor holding
    NaN or inf is a UsageError naming the file (and the tensor)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and storage errors of many kinds
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise UsageError(f"checkpoint file {path}: cannot read it ({type(e).__name__}: "
                         f"{first})") from None
    bad = _nonfinite_tensor(obj, "")
    if bad is not None:
        raise UsageError(f"checkpoint file {path}: tensor {bad or '(the file)'} holds NaN "
                         "or inf values")
    return obj


def _nonfinite_tensor(obj: Any, where: str) -> str | None:
    """The key path of the first float tensor in `obj` holding NaN or inf, else None."""
    import torch

    if isinstance(obj, torch.Tensor):
        finite = not obj.is_floating_point() or bool(torch.isfinite(obj).all())
        return None if finite else where
    items = (obj.items() if isinstance(obj, Mapping) else
             enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    for key, value in items:
        found = _nonfinite_tensor(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def payload_fingerprint(inputs: Mapping[str, Any]) -> str:
    """sha256 of an iteration's input payloads (names, dtypes, shapes, bytes): the data
    a resumed run reads at its first iteration must be the data the run would have."""
    h = hashlib.sha256()
    for name in sorted(inputs):
        payload = inputs[name]
        for field in sorted(payload):
            t = payload[field]
            h.update(f"{name}/{field}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -- RNG states of this process -------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA when in use), numpy and python RNG states as tensors/lists."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss), "kind": str(kind)},
           "python": _python_state(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _python_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: Mapping[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing --------------------------------------------------------------------------------
class CheckpointWriter:
    """Writes checkpoints into `root` (--checkpoint-dir), keeping the newest `keep`.
    Creating one removes half-written `.tmp-*` directories left by a killed run."""

    def __init__(self, root: str | Path, keep: int = 2):
        from .outputs import check_output_dir

        check_output_dir("--checkpoint-dir", str(root))
        if keep < 1:
            raise UsageError(f"--keep {keep}: keep at least 1 checkpoint")
        self.root, self.keep = Path(root), keep
        self.removed = remove_partial(self.root)

    def begin(self, iteration: int) -> Path:
        """A fresh temporary directory for the checkpoint after `iteration` iterations."""
        tmp = self.root / f"{TMP}{checkpoint_name(iteration)}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def publish(self, tmp: Path, iteration: int, manifest: Mapping[str, Any]) -> Path:
        """Checksum every file of `tmp`, write manifest.json last, rename `tmp` to its
        final name; then drop checkpoints beyond the newest `keep`."""
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            files[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        body = {"format": FORMAT, "iteration": iteration, **manifest, "files": files}
        body[SELF_SUM] = manifest_sum(body)
        path = tmp / MANIFEST
        path.write_text(json.dumps(body, indent=1, sort_keys=True), encoding="utf-8")
        file_written(path)
        for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
            fsync_path(d)
        final = self.root / checkpoint_name(iteration)
        if final.exists():   # a checkpoint of this iteration from an earlier run
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(self.root)
        self.prune()
        return final

    def prune(self) -> list[Path]:
        gone = published(self.root)[:-self.keep]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone


def remove_partial(root: Path) -> list[str]:
    """Remove the `.tmp-*` directories of checkpoints whose writer died."""
    removed = []
    for p in sorted(root.glob(f"{TMP}{PREFIX}*")):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def published(root: Path) -> list[Path]:
    """The published checkpoint directories of `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


# -- reading --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    path: Path
    manifest: Mapping[str, Any]

    @property
    def iteration(self) -> int:
        return int(self.manifest["iteration"])

    def file(self, rel: str) -> Path:
        return self.path / rel

    def run_state(self) -> dict[str, Any]:
        return json.loads(self.file(RUN_FILE).read_text(encoding="utf-8"))

    def verify(self) -> None:
        """Every listed file present with its size and sha256 (UsageError naming the first
        that is not)."""
        for rel, meta in sorted(self.manifest.get("files", {}).items()):
            f = self.path / rel
            if not f.is_file():
                raise UsageError(f"checkpoint {self.path}: file {rel} is missing "
                                 f"(listed in {MANIFEST})")
            size = f.stat().st_size
            if size != meta["bytes"]:
                raise UsageError(f"checkpoint {self.path}: file {rel} has {size} bytes, "
                                 f"{MANIFEST} says {meta['bytes']} (truncated or changed)")
            digest = sha256_file(f)
            if digest != meta["sha256"]:
                raise UsageError(f"checkpoint {self.path}: file {rel} fails its checksum "
                                 f"(sha256 {digest[:12]}..., {MANIFEST} says "
                                 f"{meta['sha256'][:12]}...)")

    def check_matches(self, expected: Mapping[str, Any]) -> None:
        """This run's graph fingerprint, seed and model shapes equal the checkpoint's."""
        m, where = self.manifest, f"checkpoint {self.path / MANIFEST}"
        if m.get("graph") != expected["graph"]:
            raise UsageError(f"{where}: written by another step: graph @{m.get('step')} "
                             f"fingerprint {m.get('graph')}, this run's @{expected['step']} "
                             f"is {expected['graph']}")
        if m.get("seed") != expected["seed"]:
            raise UsageError(f"{where}: written with --seed {m.get('seed')}, this run has "
                             f"--seed {expected['seed']} (exact resume needs the same seed)")
        theirs, ours = m.get("models", {}), expected["models"]
        for model in sorted(set(theirs) | set(ours)):
            if model not in ours or model not in theirs:
                raise UsageError(f"{where}: model {model!r} is "
                                 f"{'only in the checkpoint' if model in theirs else 'not in the checkpoint'}")
            a, b = theirs[model], ours[model]
            for name in sorted(set(a) | set(b)):
                if list(a.get(name, [])) != list(b.get(name, [])):
                    raise UsageError(f"{where}: model {model} parameter {name} has shape "
                                     f"{a.get(name, 'none')} in the checkpoint, "
                                     f"{b.get(name, 'none')} in this run")


def read_checkpoint(path: Path) -> Checkpoint:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise UsageError(f"--resume {path}: no {MANIFEST} (not a published checkpoint)")
    try:
        body = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UsageError(f"checkpoint {manifest}: not valid JSON ({e})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or "files" not in body:
        raise UsageError(f"checkpoint {manifest}: not a graphrl checkpoint manifest "
                         f"(format {body.get('format') if isinstance(body, dict) else None}, "
                         f"expected {FORMAT})")
    if SELF_SUM in body and body[SELF_SUM] != manifest_sum(body):
        raise UsageError(f"checkpoint {manifest}: fails its own checksum ({SELF_SUM}): "
                         "changed or corrupted after it was written")
    return Checkpoint(path, body)


def manifest_sum(body: Mapping[str, Any]) -> str:
    """sha256 of a manifest's content (all but its own checksum field), canonical JSON."""
    rest = {k: v for k, v in body.items() if k != SELF_SUM}
    return fingerprint(json.dumps(rest, sort_keys=True))


def find_checkpoint(path: str | Path) -> Checkpoint:
    """--resume PATH: a checkpoint directory, or a --checkpoint-dir (its newest published
    checkpoint; half-written ones are never published, so never chosen). Verified."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--resume {path}: no such directory")
    if (p / MANIFEST).is_file() or _NAME.match(p.name):
        ck = read_checkpoint(p)
    else:
        found = published(p)
        if not found:
            raise UsageError(f"--resume {path}: no published checkpoint in it "
                             f"(expected {PREFIX}NNNNNNNN directories)")
        try:
            ck = read_checkpoint(found[-1])
            ck.verify()
        except UsageError as e:
            older = ", ".join(str(f) for f in found[:-1]) or "none"
            raise UsageError(f"{e}; earlier checkpoints: {older} (pass one to --resume)") \
                from None
        return ck
    ck.verify()
    return ck


def shapes_of(named: Iterable[tuple[str, Any]]) -> dict[str, list[int]]:
    return {k: list(getattr(v, "shape", v)) for k, v in named}


__all__ = ["CheckpointWriter", "Checkpoint", "find_checkpoint", "read_checkpoint",
           "rng_state", "set_rng_state", "save_torch", "load_torch", "payload_fingerprint",
           "fingerprint", "published", "remove_partial", "manifest_sum", "MANIFEST", "RUN_FILE"]
