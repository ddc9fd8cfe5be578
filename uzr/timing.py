"""Wall and CPU seconds of a phase, side by side.

On a shared machine the wall clock measures the other jobs as much as this one; the process's CPU seconds
(all its threads, ``time.process_time``) do not. With one torch thread (``threads=1``) the CPU seconds bound the
phase's wall time on a quiet machine from above, which is what a time budget is checked against."""

from __future__ import annotations

import time


class Stopwatch:
    """Started on creation; :meth:`read` gives ``{"seconds": wall, "cpu_seconds": process CPU}`` since then."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"seconds": round(time.perf_counter() - self.wall, 1), "cpu_seconds": round(time.process_time() - self.cpu, 1)}
