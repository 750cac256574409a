"""Stopping a run between steps: the first Ctrl-C or SIGTERM is held until the running step ends."""

from __future__ import annotations

import signal
import threading

__all__ = ["HeldInterrupt"]


class HeldInterrupt:
    """Hold the first Ctrl-C (SIGINT) or SIGTERM until the running step ends, so no checkpoint holds
    half a step. SIGTERM is what ``kill``, ``timeout`` and batch schedulers (SLURM at the end of a
    job's time) send, and the only one a detached run hears: a shell starts background jobs with
    SIGINT ignored, and an ignored signal stays ignored.

    Python delivers signals to the main thread only; elsewhere this does nothing.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "HeldInterrupt":
        self.pending = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in self._SIGNALS:
                previous = signal.getsignal(number)
                if previous not in (signal.SIG_IGN, None):
                    self._previous[number] = previous
                    signal.signal(number, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
