"""The lines of a text file the user gives (prompts JSONL, metrics), decoded as UTF-8 one
line at a time, so that a file that is not UTF-8 is an error naming the line and the
byte, not a UnicodeDecodeError traceback."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .errors import UsageError


def utf8_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without its newline) for each line of `path`."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UsageError(f"{path} line {lineno}: not UTF-8 text (byte "
                                 f"{raw[e.start]:#04x} at column {e.start + 1})") from None


__all__ = ["utf8_lines"]
