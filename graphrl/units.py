"""Human-readable quantities for dumps, tables and messages."""
from __future__ import annotations


def human_bytes(n: float) -> str:
    """Binary units, one decimal above bytes: `672B`, `164.6KiB`, `128.0MiB`, `3.5GiB`."""
    sign = "-" if n < 0 else ""
    x = abs(float(n))
    if round(x) < 1024:
        return f"{sign}{x:.0f}B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        x /= 1024
        if round(x, 1) < 1024 or unit == "TiB":
            return f"{sign}{x:.1f}{unit}"
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    """`0s`, `12.5us`, `3.2ms`, `2.31s`: three or so significant digits, fixed format."""
    if s == 0:
        return "0s"
    a = abs(s)
    if round(a * 1e6, 1) < 1000:
        return f"{s * 1e6:.1f}us"
    if round(a * 1e3, 1) < 1000:
        return f"{s * 1e3:.1f}ms"
    return f"{s:.2f}s"
