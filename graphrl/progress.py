"""Progress lines for work that may take long (the placement search of a large cluster).

`Progress` is a message sink that stays silent for short work and, once `after_s` has
passed, prints at most one line every `every_s` to its stream (stderr), so a compile
that takes 0.3 s prints nothing and a 30 s search shows that it is alive and how far
it got. `done()` ends with one summary line if anything was printed."""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


class Progress:
    def __init__(self, prefix: str, stream: Optional[TextIO] = None, after_s: float = 2.0,
                 every_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.prefix = prefix
        self.stream = stream if stream is not None else sys.stderr
        self.after_s, self.every_s, self.clock = after_s, every_s, clock
        self.start = clock()
        self.last_print: Optional[float] = None
        self.stage, self.count = "", 0

    def __call__(self, stage: str, count: int = 0) -> None:
        """Report that `stage` is running and has done `count` units of work."""
        self.stage, self.count = stage, count
        now = self.clock()
        if now - self.start < self.after_s:
            return
        if self.last_print is not None and now - self.last_print < self.every_s:
            return
        self.last_print = now
        self._write(now)

    def done(self) -> None:
        if self.last_print is not None:
            self.stage = "done"
            self._write(self.clock())

    @property
    def printed(self) -> bool:
        return self.last_print is not None

    def _write(self, now: float) -> None:
        what = f"{self.stage}: {self.count:,} placements evaluated" if self.count else self.stage
        print(f"{self.prefix}: {what} ({now - self.start:.1f} s)", file=self.stream, flush=True)
