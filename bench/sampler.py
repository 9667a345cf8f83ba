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


class BoundedSeries:
    """Readings ``(t, v)`` over a whole run in at most ``max_points`` points, every peak and trough kept.

    Readings fall into time buckets of width ``dt``; a bucket keeps its smallest and its largest reading (each
    with its time). When there are more than ``max_points // 2`` buckets, neighbours merge and ``dt`` doubles,
    so the series always spans the whole run at the finest resolution that fits, and its max and min are the
    max and min of every reading ever added."""

    def __init__(self, max_points: int = 4000, dt: float = 0.01) -> None:
        if max_points < 4:
            raise ValueError("max_points must be >= 4")
        self.max_points, self.dt = max_points, dt
        self._b: dict[int, list] = {}  # bucket index -> [t_min, v_min, t_max, v_max]
        self.count = 0

    def add(self, t: float, v) -> None:
        self.count += 1
        i = int(t // self.dt)
        b = self._b.get(i)
        if b is None:
            self._b[i] = [t, v, t, v]
            if len(self._b) > self.max_points // 2:
                self._halve()
            return
        if v < b[1]:
            b[0], b[1] = t, v
        if v > b[3]:
            b[2], b[3] = t, v

    def _halve(self) -> None:
        while len(self._b) > self.max_points // 2:
            self.dt *= 2
            merged: dict[int, list] = {}
            for i, b in self._b.items():
                m = merged.get(i // 2)
                if m is None:
                    merged[i // 2] = list(b)
                    continue
                if b[1] < m[1]:
                    m[0], m[1] = b[0], b[1]
                if b[3] > m[3]:
                    m[2], m[3] = b[2], b[3]
            self._b = merged

    def points(self) -> list[tuple[float, int]]:
        """The kept readings in time order (a bucket's min and max; one point where they are the same reading)."""
        out = []
        for i in sorted(self._b):
            t0, v0, t1, v1 = self._b[i]
            pair = [(t0, v0)] if (t0, v0) == (t1, v1) else sorted([(t0, v0), (t1, v1)])
            out += pair
        return out


class Poller:
    """Calls ``fn`` every ``interval_s`` seconds in a daemon thread until ``stop()``; a call that raises ends the
    polling (what was read before stands). The loop of the memory samplers and of the energy meter's power
    readings."""

    def __init__(self, fn: Callable[[], object], interval_s: float, name: str = "snnbench-sampler") -> None:
        self.fn, self.interval_s = fn, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
            except Exception:
                return

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class Sampler(PeakReadings):
    """A background thread that reads a value every ``interval_s`` and keeps the peak and the series.

    ``read`` returns bytes (or None when no reading can be had). The baseline is one reading taken at
    ``start`` unless given; ``peak_above_baseline`` is the largest reading minus it. The series is a
    :class:`BoundedSeries`: the whole run, its peaks included, in at most ``max_samples`` points.
    """

    def __init__(self, read: Callable[[], int | None], interval_s: float = 0.005, baseline: int | None = None,
                 max_samples: int = 4000) -> None:
        self.read, self.interval_s = read, interval_s
        self.baseline = baseline
        self.peak: int | None = None
        self.series = BoundedSeries(max_samples, dt=interval_s)
        self._poller: Poller | None = None
        self._t0 = 0.0

    @property
    def samples(self) -> list[tuple[float, int]]:
        """(seconds since start, bytes)"""
        return self.series.points()

    @property
    def started_at(self) -> float:
        """``time.perf_counter()`` when it started: the origin of ``samples``' times."""
        return self._t0

    def _take(self) -> None:
        v = self.read()
        if v is None:
            return
        if self.peak is None or v > self.peak:
            self.peak = v
        self.series.add(time.perf_counter() - self._t0, v)

    def start(self) -> "Sampler":
        self._t0 = time.perf_counter()
        if self.baseline is None:
            self.baseline = self.read()
        self._take()
        self._poller = Poller(self._take, self.interval_s).start()
        return self

    def stop(self) -> "Sampler":
        self._take()
        if self._poller is not None:
            self._poller.stop()
        return self

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
