"""Stop cleanly when asked: SIGTERM (a spot/preemptible VM being reclaimed) or SIGINT (Ctrl-C).

The train loop asks `should_stop(step)` after every step: the step in flight finishes, a
checkpoint is written and awaited, and the run exits 0 saying how to resume. A second signal
aborts at once. On multi-host runs every host must stop at the same step, so JAX's preemption
sync point (the coordination service catches SIGTERM on each host and agrees on a step) decides.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import jax


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be set from the main thread; multi-host runs use the sync point.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: no more waiting
            os._exit(128 + signum)
        self.signum = signum

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signum is not None
