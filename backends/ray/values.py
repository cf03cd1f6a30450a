"""The driver's handle on a payload while a RayExecutor step runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from graphrl.backends.local import WeightsToken


@dataclass
class _Value:
    """A payload on the driver: Ray objects (parts, concatenated along the batch; `bounds`
    their rows) or a local payload, or a weights token."""

    parts: Optional[list[Any]] = None
    bounds: Optional[list[tuple[int, int]]] = None
    stamps: list[Any] = field(default_factory=list)   # stamp refs of the producing calls
    mean: bool = False       # parts are per-rank statistics to average, not rows
    local: Any = None
    token: Optional[WeightsToken] = None
