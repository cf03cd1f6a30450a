"""'did you mean X?' for unknown names (roles, keys, calls, keyword arguments)."""
from __future__ import annotations

import difflib
from typing import Any, Iterable


def suggest(name: Any, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest known name, '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = ["suggest"]
