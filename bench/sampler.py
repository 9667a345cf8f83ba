"""A background sampling thread (no torch here: the NVML sampler process imports only this and pynvml)."""

from __future__ import annotations

import threading
import time
from typing import Callable


def norm_uuid(u) -> str:
    """A GPU UUID as torch and NVML both spell it: lower case, without NVML's "GPU-"/"MIG-" prefix."""
    u = (u.decode() if isinstance(u, bytes) else str(u)).strip().lower()
    for prefix in ("gpu-", "mig-"):
        if u.startswith(prefix):
            u = u[len(prefix):]
    return u


class PeakReadings:
    """``baseline`` and ``peak`` readings, and the peak above the baseline (None while either is missing)."""

    baseline: int | None
    peak: int | None

    @property
    def peak_above_baseline(self) -> int | None:
        if self.peak is None or self.baseline is None:
            return None
        return self.peak - self.baseline


class Sampler(PeakReadings):
    """A background thread that reads a value every ``interval_s`` and keeps the peak and the series.

    ``read`` returns bytes (or None when no reading can be had). The baseline is one reading taken at
    ``start`` unless given; ``peak_above_baseline`` is the largest reading minus it.
    """

    def __init__(self, read: Callable[[], int | None], interval_s: float = 0.005, baseline: int | None = None,
                 max_samples: int = 20000) -> None:
        self.read, self.interval_s = read, interval_s
        self.baseline = baseline
        self.peak: int | None = None
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self.max_samples = max_samples
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._n = 0

    def _take(self) -> None:
        v = self.read()
        if v is None:
            return
        if self.peak is None or v > self.peak:
            self.peak = v
        self._n += 1
        # keep a bounded series: every sample while few, then every k-th
        if len(self.samples) < self.max_samples:
            self.samples.append((time.perf_counter() - self._t0, v))
        elif self._n % 16 == 0:
            self.samples[-1] = (time.perf_counter() - self._t0, v)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def start(self) -> "Sampler":
        self._t0 = time.perf_counter()
        if self.baseline is None:
            self.baseline = self.read()
        self._take()
        self._thread = threading.Thread(target=self._run, name="snnbench-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "Sampler":
        self._take()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
