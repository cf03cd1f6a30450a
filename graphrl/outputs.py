"""Output paths: checked before any work starts, written so that a crash never leaves a
half-written file where a good one was.

- `check_output_file` / `check_output_dir`: the flag's path is writable now (its folder
  exists and is a writable folder, the path itself is not a folder / not a file), so a
  long run cannot die at the end on a bad --trace or --dump.
- `atomic_write_text`: write to a temporary file in the same folder, flush, fsync, then
  rename over the target (POSIX rename is atomic): readers see the old file or the new
  one, never a truncated one (e.g. when the disk fills up mid-write).
- `MetricsLog`: --metrics as JSON lines, appended one line at a time and flushed; an
  existing non-empty file is refused unless overwrite=True; a non-finite number is
  written as null (JSON has no NaN).
- `writing(flag, path)`: a write that fails (a full disk, a file-size limit, a folder
  made read-only during the run) is one UsageError naming the flag, the path and the
  reason, whichever library wrote (open/write, torch.save, safetensors).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator, TextIO

from .errors import UsageError


def why_not_writable(folder: Path) -> str | None:
    """None if a file can be created in `folder` now (tried, not guessed: permission bits
    say little to root or on read-only mounts)."""
    if not folder.exists():
        return f"directory {folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".graphrl-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in directory {folder} ({e.strerror})"
    return None


def check_output_file(flag: str, path: str, *, overwrite: bool = True) -> None:
    """UsageError unless `path` can be written as a file (`overwrite=False`: and holds no
    earlier non-empty file)."""
    p = Path(path)
    where = f"{flag} {path}"
    if not path or path.endswith(os.sep):
        raise UsageError(f"{where}: expected a file name")
    if p.is_dir():
        raise UsageError(f"{where}: is a directory, expected a file name")
    why = why_not_writable(p.parent if str(p.parent) else Path("."))
    if why:
        raise UsageError(f"{where}: {why}")
    if p.exists():
        if not p.is_file():
            raise UsageError(f"{where}: exists and is not a regular file")
        if not overwrite and p.stat().st_size > 0:
            raise UsageError(f"{where}: the file exists (an earlier run's); choose another "
                             "name or pass --overwrite")


def check_output_dir(flag: str, path: str) -> None:
    """UsageError unless `path` is (or is now made) a folder graphrl can write in."""
    p = Path(path)
    where = f"{flag} {path}"
    if p.exists() and not p.is_dir():
        raise UsageError(f"{where}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{where}: cannot create the directory ({e.strerror})") from None
    why = why_not_writable(p)
    if why:
        raise UsageError(f"{where}: {why}")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MetricsLog:
    """--metrics FILE: one JSON object per line, written and flushed as each arrives."""

    def __init__(self, path: str, overwrite: bool = False):
        check_output_file("--metrics", path, overwrite=overwrite)
        self.path = path
        self._file: TextIO | None = open(path, "w", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        assert self._file is not None, "MetricsLog used after close()"
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in row.items()}
        file = self._file
        try:
            with writing("--metrics", self.path):
                file.write(json.dumps(row, allow_nan=False) + "\n")
                file.flush()
        except UsageError:
            self._file = None    # nothing more goes to a file that failed
            with contextlib.suppress(OSError):
                file.close()
            raise

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with writing("--metrics", self.path):
                file.close()


def _io_failure(e: BaseException) -> str | None:
    """Why a write failed when `e` is a failed write (an OSError, or what torch.save and
    safetensors raise for one), else None: an error of another kind is not the disk's."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    writers = ("torch/serialization.py", "safetensors")
    frames = traceback.extract_tb(e.__traceback__)
    if type(e).__module__.startswith("safetensors") or any(
            w in f.filename for f in frames for w in writers):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"{first}; is the disk full?"
    return None


@contextlib.contextmanager
def writing(flag: str, path: str | Path) -> Iterator[None]:
    """Turn a failed write inside the block into one UsageError naming flag and path."""
    try:
        yield
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - _io_failure re-raises what is not a write
        why = _io_failure(e)
        if why is None:
            raise
        raise UsageError(f"{flag} {path}: cannot write ({why})") from e


__all__ = ["check_output_file", "check_output_dir", "atomic_write_text",
           "atomic_write_bytes", "MetricsLog", "writing"]
