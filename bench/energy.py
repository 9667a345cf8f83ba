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
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")
POWER_INTERVAL_S = 0.02
IDLE_S = 0.5


class _Counter:
    """A cumulative counter read in joules, with wraparound (RAPL) handled by adding the range back."""

    def __init__(self, read, wrap_j: float | None = None) -> None:
        self._read, self.wrap_j = read, wrap_j
        self.last = read()
        self.total = 0.0

    def __call__(self) -> float:
        now = self._read()
        delta = now - self.last
        if delta < 0 and self.wrap_j:
            delta += self.wrap_j
        self.total += max(delta, 0.0)
        self.last = now
        return self.total


class _PowerIntegral:
    """Power readings (watts) every ``interval`` s in a thread, integrated over time."""

    def __init__(self, read_w, interval: float = POWER_INTERVAL_S, clock=time.perf_counter) -> None:
        self.read_w, self.interval, self.clock = read_w, interval, clock
        self.samples: list[tuple[float, float]] = []
        self.energy, self._stop = 0.0, threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        t, w = self.clock(), self.read_w()
        with self._lock:
            if self.samples:
                t0, w0 = self.samples[-1]
                self.energy += (t - t0) * (w + w0) / 2
            self.samples.append((t, w))

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a reading that fails ends the series; what was integrated stands
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __call__(self) -> float:
        with self._lock:
            if not self.samples:
                return 0.0
            t0, w0 = self.samples[-1]
            return self.energy + (self.clock() - t0) * w0

    def mean_w(self, since: float = 0.0) -> float | None:
        ws = [w for t, w in self.samples if t >= since]
        return sum(ws) / len(ws) if ws else None


class EnergyMeter:
    """Joules since ``start()`` from the best source that works (module docstring)."""

    def __init__(self, counter=None, power=None, counter_name: str = "nvml counter",
                 power_name: str = "nvml power", clock=time.perf_counter, idle_s: float = IDLE_S) -> None:
        self._counter_read, self._power_read = counter, power
        self.counter_name, self.power_name, self.clock, self.idle_s = counter_name, power_name, clock, idle_s
        self.counter: _Counter | None = None
        self.power: _PowerIntegral | None = None
        self._idle: tuple[dict, float] | None = None  # both sources over the idle wait, and its seconds

    def start(self) -> None:
        if self._counter_read is not None:
            self.counter = _Counter(self._counter_read)
        if self._power_read is not None:
            self.power = _PowerIntegral(self._power_read, clock=self.clock)
            self.power.start()
        self._base_counter = self.counter() if self.counter else 0.0
        self._base_power = self.power() if self.power else 0.0
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
        return (self.counter() - self._base_counter if self.counter else None,
                self.power() - self._base_power if self.power else None)

    def stop(self) -> None:
        if self.power is not None:
            self.power.stop()


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


def energy_meter(device, nvml_dev=None, idle_s: float = IDLE_S) -> tuple[EnergyMeter | None, str | None]:
    """The meter for a torch device: NVML for a GPU with an NVML device, RAPL for the CPU."""
    if device.type == "cuda":
        if nvml_dev is None:
            return None, "no NVML device for this GPU"
        import pynvml

        return nvml_meter(pynvml, nvml_dev.handle, idle_s)
    return rapl_meter(idle_s=idle_s)
