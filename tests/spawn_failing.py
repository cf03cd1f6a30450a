"""A spawned rank that fails (tests/test_check_model.py): in its own small module so the
spawned process imports nothing else of the tests."""
from __future__ import annotations

import time


def failing_rank(rank: int, world: int, port: int, hang_s: float) -> None:
    """Hangs for hang_s seconds (hang_s > 0), else rank 1 raises."""
    if hang_s:
        time.sleep(hang_s)
    elif rank == 1:
        raise ValueError("boom on rank 1")
