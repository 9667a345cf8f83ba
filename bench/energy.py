"""Training energy: NVML's energy counter on a GPU (or its power readings integrated), RAPL on a CPU, or nothing
with the reason.

    meter, reason = energy_meter(device, nvml_device)   # None and why, where nothing can be read
    meter.start()                                       # idle power first (IDLE_S), then the readings run
    span = Span(meter); ...; joules = pick(meter, span.end())  # energy over a stretch, from the chosen source
    meter.stop()

Sources, best first:

- ``nvml counter``: ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded; Volta and
  later). Read directly at the boundaries (one call, after the step's synchronisation).
- ``nvml power``: ``nvmlDeviceGetPowerUsage`` (milliwatts) sampled every ``POWER_INTERVAL_S`` by a thread and
  integrated (trapezoids; the last reading held to the moment asked). Used where the counter is unsupported
  (older GPUs, some MIG and virtualised setups) or does not advance while power is drawn.
- ``rapl``: the CPU packages' ``/sys/class/powercap/intel-rapl:<n>/energy_uj``, each with its
  ``max_energy_range_uj`` wraparound; unreadable on most VMs (this project's CI machine included), and then
  energy is null with that reason, never a zero.

``meter.trace()`` is the power over the cell for the memory-over-time figure: the power readings where there are
any, else the counter read every ``TRACE_INTERVAL_S`` and differenced; a bounded series (``BoundedSeries``), so a
cell of hours keeps a few thousand points.

Where a GPU cell's NVML memory sampler runs in its own process (``bench.nvml_sampler``, the usual case), the
energy is read there too (``ProcessEnergyMeter``): that process samples and integrates the power, and reads the
counter when the training process asks at a boundary (after the step's synchronisation; one short message each
way), so the training process runs no sampling thread. Otherwise (no sampler process; RAPL on a CPU) the meter
reads in the training process, its power or counter polled by a thread.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .sampler import BoundedSeries, Poller

RAPL_ROOT = Path("/sys/class/powercap")
POWER_INTERVAL_S = 0.02
TRACE_INTERVAL_S = 0.1
IDLE_S = 0.5


class _Counter:
    """A cumulative counter read in joules, with wraparound (RAPL) handled by adding the range back."""

    def __init__(self, read, wrap_j: float | None = None) -> None:
        self._read, self.wrap_j = read, wrap_j
        self.last = read()
        self.total = 0.0
        self._lock = threading.Lock()  # read at the boundaries and by the trace thread

    def __call__(self) -> float:
        with self._lock:
            now = self._read()
            delta = now - self.last
            if delta < 0 and self.wrap_j:
                delta += self.wrap_j
            self.total += max(delta, 0.0)
            self.last = now
            return self.total


class _CounterWatts:
    """The power an energy counter implies: its joules differenced between readings, as (t, W) in a bounded
    series (the trace of a counter-only source such as RAPL)."""

    def __init__(self, counter: _Counter, clock=time.perf_counter) -> None:
        self.counter, self.clock = counter, clock
        self.series = BoundedSeries(dt=TRACE_INTERVAL_S)
        self._last = (clock(), counter())

    def sample(self) -> None:
        t, j = self.clock(), self.counter()
        t0, j0 = self._last
        if t > t0:
            self.series.add((t0 + t) / 2, (j - j0) / (t - t0))
        self._last = (t, j)


class _PowerIntegral:
    """Power readings (watts), integrated over time (trapezoids); the readings also go to a bounded series, the
    trace. ``sample()`` takes one; ``EnergyMeter`` polls it every ``POWER_INTERVAL_S``."""

    def __init__(self, read_w, clock=time.perf_counter) -> None:
        self.read_w, self.clock = read_w, clock
        self.series = BoundedSeries(dt=POWER_INTERVAL_S)
        self.energy = 0.0
        self._last: tuple[float, float] | None = None
        self._lock = threading.Lock()

    def sample(self) -> None:
        t, w = self.clock(), self.read_w()
        with self._lock:
            if self._last is not None:
                t0, w0 = self._last
                self.energy += (t - t0) * (w + w0) / 2
            self._last = (t, w)
            self.series.add(t, w)

    def __call__(self) -> float:
        with self._lock:
            if self._last is None:
                return 0.0
            t0, w0 = self._last
            return self.energy + (self.clock() - t0) * w0


class EnergyMeter:
    """Joules since ``start()`` from the best source that works (module docstring)."""

    def __init__(self, counter=None, power=None, counter_name: str = "nvml counter",
                 power_name: str = "nvml power", clock=time.perf_counter, idle_s: float = IDLE_S) -> None:
        self._counter_read, self._power_read = counter, power
        self.counter_name, self.power_name, self.clock, self.idle_s = counter_name, power_name, clock, idle_s
        self.counter: _Counter | None = None
        self.power: _PowerIntegral | None = None
        self._watts: _CounterWatts | None = None  # the trace of a counter-only meter
        self._polls: list[Poller] = []
        self._idle: tuple[dict, float] | None = None  # both sources over the idle wait, and its seconds

    def _open(self) -> None:
        """The sources, read here: the counter directly, the power by a polling thread."""
        if self._counter_read is not None:
            self.counter = _Counter(self._counter_read)
        if self._power_read is not None:
            self.power = _PowerIntegral(self._power_read, clock=self.clock)
            self.power.sample()
            self._polls.append(Poller(self.power.sample, POWER_INTERVAL_S, "snnbench-energy").start())
        elif self.counter is not None:
            self._watts = _CounterWatts(self.counter, clock=self.clock)
            self._polls.append(Poller(self._watts.sample, TRACE_INTERVAL_S, "snnbench-energy").start())

    def _totals(self) -> tuple[float | None, float | None]:
        """Each source's joules since it was opened (None where absent)."""
        return self.counter() if self.counter else None, self.power() if self.power else None

    def start(self) -> None:
        self._open()
        c, p = self._totals()
        self._base = (c or 0.0, p or 0.0)
        if self.idle_s:  # idle: before the cell allocates or computes anything
            t, span = self.clock(), Span(self)
            time.sleep(self.idle_s)
            self._idle = (span.end(), self.clock() - t)

    @property
    def idle_power_w(self) -> float | None:
        """The power drawn during the idle wait, by the same source as the energy (``source``)."""
        if self._idle is None:
            return None
        joules, seconds = pick(self, self._idle[0]), self._idle[1]
        return joules / seconds if joules is not None and seconds > 0 else None

    @property
    def source(self) -> str | None:
        """The counter while it advances (or nothing else is there), else integrated power."""
        if self.counter is not None and (self.counter.total > 0 or self.power is None):
            return self.counter_name
        if self.power is not None:
            return self.power_name
        return None

    def read_both(self) -> tuple[float | None, float | None]:
        """Joules since start() by the counter and by integrated power (None where absent): both are kept, so that
        the source can be chosen when the cell ends."""
        c, p = self._totals()
        return None if c is None else c - self._base[0], None if p is None else p - self._base[1]

    def stop(self) -> None:
        for p in self._polls:
            p.stop()

    def trace(self) -> list[tuple[float, float]]:
        """(``time.perf_counter()``, watts) over the cell: the power readings, else the counter's differences
        (module docstring)."""
        series = self.power.series if self.power is not None else self._watts.series if self._watts else None
        return series.points() if series is not None else []


class _Reported:
    """One source's joules as the NVML sampler process last reported them; ``total`` as ``_Counter``'s."""

    total = 0.0


class ProcessEnergyMeter(EnergyMeter):
    """The meter of a GPU whose NVML memory sampler runs in its own process (``bench.nvml_sampler``): that process
    reads the counter on request and samples and integrates the power (no thread in the training process); this
    side asks it at the boundaries, one message each way."""

    def __init__(self, sampler, has_counter: bool, has_power: bool, idle_s: float = IDLE_S) -> None:
        super().__init__(idle_s=idle_s)
        self.sampler, self.has_counter, self.has_power = sampler, has_counter, has_power

    def _open(self) -> None:
        self.counter = _Reported() if self.has_counter else None
        self.power = _Reported() if self.has_power else None

    def _totals(self) -> tuple[float | None, float | None]:
        """Both sources in one request (``NvmlProcessSampler.energy``): one round trip, one moment."""
        reply = self.sampler.energy()
        for source, key in ((self.counter, "counter"), (self.power, "power")):
            if source is not None:
                source.total = reply[key]
        return (self.counter.total if self.counter else None, self.power.total if self.power else None)

    def trace(self) -> list[tuple[float, float]]:
        return list(self.sampler.power_trace)


class Span:
    """Energy over stretches of a cell (an epoch's training steps, the measured steps), from both sources, the
    source chosen when the cell ends (``EnergyMeter.source``)."""

    def __init__(self, meter: EnergyMeter) -> None:
        self.meter = meter
        self.begin = meter.read_both()

    def end(self) -> dict:
        c1, p1 = self.meter.read_both()
        c0, p0 = self.begin
        return {"counter": None if c1 is None else c1 - c0, "power": None if p1 is None else p1 - p0}


def pick(meter: EnergyMeter, span: dict) -> float | None:
    return span["counter"] if meter.source == meter.counter_name else span["power"]


def nvml_meter(nvml, handle, idle_s: float = IDLE_S) -> tuple[EnergyMeter | None, str | None]:
    """The meter of one GPU through ``nvml`` (pynvml, or a stand-in with the same two functions)."""
    counter = power = None
    reasons = []
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        counter = lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # noqa: E731  (mJ -> J)
    except Exception as e:
        reasons.append(f"no energy counter ({type(e).__name__})")
    try:
        nvml.nvmlDeviceGetPowerUsage(handle)
        power = lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3  # noqa: E731  (mW -> W)
    except Exception as e:
        reasons.append(f"no power readings ({type(e).__name__})")
    if counter is None and power is None:
        return None, "NVML: " + "; ".join(reasons)
    return EnergyMeter(counter, power, idle_s=idle_s), None


def rapl_meter(root: Path = RAPL_ROOT, idle_s: float = IDLE_S) -> tuple[EnergyMeter | None, str | None]:
    """The CPU packages' RAPL counters summed (each with its own wraparound), or None and why."""
    domains = sorted(p for p in Path(root).glob("intel-rapl:*") if p.name.count(":") == 1)
    if not domains:
        return None, (f"no RAPL domain under {root} (most virtual machines expose none): CPU energy cannot be "
                      "measured here")
    counters = []
    for d in domains:
        try:
            wrap = int((d / "max_energy_range_uj").read_text()) / 1e6
            (d / "energy_uj").read_text()
        except (OSError, ValueError) as e:
            return None, f"RAPL {d / 'energy_uj'} is not readable ({e.__class__.__name__}; reading it needs root on recent kernels)"
        counters.append(_Counter(lambda d=d: int((d / "energy_uj").read_text()) / 1e6, wrap))
    return EnergyMeter(lambda: sum(c() for c in counters), None, counter_name="rapl", idle_s=idle_s), None


def energy_meter(device, nvml_dev=None, idle_s: float = IDLE_S, sampler=None) -> tuple[EnergyMeter | None, str | None]:
    """The meter for a torch device: NVML for a GPU with an NVML device (read by its sampler process when there is
    one running: ``NvmlProcessSampler``), RAPL for the CPU."""
    if device.type == "cuda":
        if sampler is not None and sampler.energy_sources is not None:
            counter, power, reason = sampler.energy_sources
            if not (counter or power):
                return None, reason
            return ProcessEnergyMeter(sampler, counter, power, idle_s), None
        if nvml_dev is None:
            return None, "no NVML device for this GPU"
        import pynvml

        return nvml_meter(pynvml, nvml_dev.handle, idle_s)
    return rapl_meter(idle_s=idle_s)
