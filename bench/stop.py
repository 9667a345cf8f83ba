"""Stop requests: SIGTERM, SIGUSR1 and SIGUSR2 (what Slurm and submitit send before a preemption, a requeue or a
time limit) raise a flag; a train cell checkpoints at its next step boundary and ends as ``preempted``.

Imports nothing heavy, so a worker installs the handlers before it imports torch: a signal during start-up is
then a request like any other, not the default action (SIGUSR1/SIGUSR2 terminate a process that does not
handle them).
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        self._forward: list[Callable[[int], None]] = []

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        for f in list(self._forward):
            f(signum)

    def install(self) -> bool:
        """Handle the stop signals in this process (from the main thread only; False elsewhere)."""
        if threading.current_thread() is not threading.main_thread() or self._old:
            return bool(self._old)
        for s in SIGNALS:
            self._old[s] = signal.signal(s, self._handler)
        return True

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def forward(self, f: Callable[[int], None]) -> Callable[[], None]:
        """Call ``f(signum)`` on every stop signal (a launcher passes it on to its worker); returns the undo."""
        self._forward.append(f)
        return lambda: self._forward.remove(f) if f in self._forward else None

    def clear(self) -> None:
        self.signum = None


STOP = StopRequest()  # the process's one stop flag
