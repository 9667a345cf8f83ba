"""Energy arithmetic against stand-ins: a scripted NVML (counter, a counter that does not advance, power only,
nothing), scripted RAPL files (with a wraparound), and the row's columns from epochs."""

import time
from types import SimpleNamespace

import pytest

from bench.energy import EnergyMeter, Span, _PowerIntegral, nvml_meter, pick, rapl_meter
from bench.runner import energy_columns


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_power_integral_is_the_trapezoid_sum_held_to_now():
    clock, watts = FakeClock(), iter([10.0, 30.0, 30.0, 0.0])
    p = _PowerIntegral(lambda: next(watts), clock=clock)
    for dt in (0.0, 2.0, 1.0, 4.0):
        clock.t += dt
        p.sample()
    # (2 s at 10->30: 40 J) + (1 s at 30: 30 J) + (4 s at 30->0: 60 J), then 0 W held for 5 s
    clock.t += 5.0
    assert p() == pytest.approx(130.0)
    assert p.series.points() == [(100.0, 10.0), (102.0, 30.0), (103.0, 30.0), (107.0, 0.0)]


def test_trace_is_the_power_readings_or_the_counter_differenced():
    """With power readings, the trace is those readings; a counter-only meter (RAPL) gives the counter's joules
    over each interval divided by its seconds, at the interval's middle."""
    clock, watts = FakeClock(), iter([50.0, 70.0, 90.0])
    meter = EnergyMeter(power=lambda: next(watts), clock=clock, idle_s=0)
    meter.start()
    for _ in range(2):
        clock.t += 1.0
        meter.power.sample()
    meter.stop()
    assert meter.trace() == [(100.0, 50.0), (101.0, 70.0), (102.0, 90.0)]
    clock, joules = FakeClock(), {"v": 0.0}
    meter = EnergyMeter(counter=lambda: joules["v"], clock=clock, idle_s=0)
    meter.start()
    for dt, dj in ((0.5, 10.0), (2.0, 30.0)):
        clock.t += dt
        joules["v"] += dj
        meter._watts.sample()
    meter.stop()
    assert meter.trace() == [(100.25, 20.0), (101.5, 15.0)]
    assert EnergyMeter(counter=None, power=None, idle_s=0).trace() == []


def test_a_cell_stores_its_power_trace_beside_its_memory(tmp_path, monkeypatch):
    """A real train cell with a stand-in NVML power reading of 123 W: its samples hold power rows of 123 W on the
    time axis of its RSS samples, and its energy is integrated from them."""
    from bench import runner
    from bench.grid import Cell
    from reports.results import load_results, write_cell

    monkeypatch.setattr(runner, "energy_meter", lambda device, nvml, sampler=None: nvml_meter(
        _nvml(power=lambda h: 123_000.0), "h", idle_s=0.05))
    cell = Cell(method="bptt_m", arch="cnn_digits", dataset="digits", T=2, epochs=1, batch_size=64, train_subset=256)
    res = runner.run_cell(cell)
    assert res.status == "ok", res.row["error"]
    write_cell(tmp_path, cell.key, res.row, res.epochs, res.samples)
    s = load_results(tmp_path, "samples")
    power, rss = s[s["source"] == "power"], s[s["source"] == "rss"]
    assert len(power) >= 3 and (power["w"] == 123.0).all() and power["mib"].isna().all()
    assert 0 <= power["t_s"].min() and power["t_s"].max() <= rss["t_s"].max() + 0.5
    assert res.row["energy_source"] == "nvml power" and res.row["power_mean_w"] == pytest.approx(123.0, rel=0.02)


def _nvml(counter=None, power=None):
    def unsupported(handle):
        raise RuntimeError("NVMLError_NotSupported")
    return SimpleNamespace(nvmlDeviceGetTotalEnergyConsumption=counter or unsupported,
                           nvmlDeviceGetPowerUsage=power or unsupported)


def test_nvml_counter_gives_the_energy_of_each_span():
    mj = {"v": 5_000_000.0}  # millijoules since the driver loaded
    meter, reason = nvml_meter(_nvml(counter=lambda h: mj["v"], power=lambda h: 250_000.0), "h", idle_s=0)
    assert reason is None
    meter.start()
    span = Span(meter)
    mj["v"] += 12_345.0
    first = span.end()
    span = Span(meter)
    mj["v"] += 1_000.0
    second = span.end()
    meter.stop()
    assert meter.source == "nvml counter"
    assert pick(meter, first) == pytest.approx(12.345) and pick(meter, second) == pytest.approx(1.0)


def _span_over(meter, seconds: float) -> tuple[dict, float]:
    """Both sources' joules over a span of ``seconds`` of sleep, and the seconds it really lasted."""
    t0 = time.perf_counter()
    span = Span(meter)
    time.sleep(seconds)
    got = span.end()
    return got, time.perf_counter() - t0


def test_a_counter_that_does_not_advance_falls_back_to_integrated_power():
    """A counter stuck at one value (some MIG and virtualised setups) while 200 W are drawn: the energy is the
    integral of the power readings, 200 W x the seconds the span lasted."""
    meter, _ = nvml_meter(_nvml(counter=lambda h: 42.0, power=lambda h: 200_000.0), "h", idle_s=0)
    meter.start()
    got, elapsed = _span_over(meter, 0.15)
    meter.stop()
    assert meter.source == "nvml power"
    assert got["counter"] == 0.0
    assert 200.0 * 0.15 <= pick(meter, got) <= 200.0 * elapsed + 1e-6


def test_power_only_and_nothing_at_all():
    meter, reason = nvml_meter(_nvml(power=lambda h: 100_000.0), "h", idle_s=0)
    assert meter is not None and reason is None and meter.counter_name and meter._counter_read is None
    meter.start()
    meter.stop()
    assert meter.source == "nvml power"
    meter, reason = nvml_meter(_nvml(), "h")
    assert meter is None and "no energy counter" in reason and "no power readings" in reason


def _rapl(root, domains):
    for name, (energy, wrap) in domains.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{wrap}\n")


def test_rapl_sums_packages_and_handles_the_wraparound(tmp_path):
    """Two packages; the first wraps (range 1000 J) during the span: 999.5 J -> 0.7 J is 1.2 J, not -998.8 J.
    A sub-domain (intel-rapl:0:0, the cores) is inside its package and not added again."""
    _rapl(tmp_path, {"intel-rapl:0": (999_500_000, 1_000_000_000), "intel-rapl:1": (10_000_000, 1_000_000_000),
                     "intel-rapl:0:0": (5, 1_000_000_000)})
    meter, reason = rapl_meter(tmp_path, idle_s=0)
    assert reason is None
    meter.start()
    span = Span(meter)
    _rapl(tmp_path, {"intel-rapl:0": (700_000, 1_000_000_000), "intel-rapl:1": (12_500_000, 1_000_000_000),
                     "intel-rapl:0:0": (900_000_000, 1_000_000_000)})
    got = pick(meter, span.end())
    meter.stop()
    assert meter.source == "rapl" and got == pytest.approx(1.2 + 2.5)


def test_no_rapl_is_a_reason_not_a_zero(tmp_path):
    meter, reason = rapl_meter(tmp_path / "none")
    assert meter is None and "no RAPL domain" in reason
    (tmp_path / "r" / "intel-rapl:0").mkdir(parents=True)
    meter, reason = rapl_meter(tmp_path / "r")
    assert meter is None and "not readable" in reason


def test_row_columns_from_the_epochs():
    """Two epochs of 10 and 20 steps that took 2 s and 3 s and 40 J and 80 J: 60 J per epoch, 4 J per step,
    24 W; each epoch row keeps its own joules; the source is the meter's."""
    meter = EnergyMeter(counter=lambda: 0.0, power=None, idle_s=0)
    meter.start()
    meter.stop()
    meter.counter.total = 1.0  # it advanced
    meter._idle = ({"counter": 8.0, "power": None}, 2.0)  # 4 W while idle
    epochs = [{"epoch": 1, "epoch_time_s": 2.0, "steps": 10, "energy_counter_j": 40.0, "energy_power_j": None},
              {"epoch": 2, "epoch_time_s": 3.0, "steps": 20, "energy_counter_j": 80.0, "energy_power_j": None}]
    row = {"energy_null_reason": None}
    energy_columns(meter, row, epochs)
    assert row["energy_epoch_j"] == 60.0 and row["energy_per_step_j"] == 4.0 and row["power_mean_w"] == 24.0
    assert row["energy_above_idle_per_step_j"] == pytest.approx((120.0 - 4.0 * 5.0) / 30)
    assert [e["energy_j"] for e in epochs] == [40.0, 80.0] and "energy_counter_j" not in epochs[0]
    assert row["energy_source"] == "nvml counter"
    row, epochs = {"energy_null_reason": "no RAPL domain"}, [{"epoch": 1, "epoch_time_s": 1.0, "steps": 3}]
    energy_columns(None, row, epochs)
    assert "energy_per_step_j" not in row and epochs[0]["energy_j"] is None


def test_idle_power_comes_from_the_source_the_energy_does():
    """A counter stuck at one value while 150 W are drawn: the idle power is the integrated power's, 150 W, not
    the stuck counter's 0 W."""
    meter, _ = nvml_meter(_nvml(counter=lambda h: 42.0, power=lambda h: 150_000.0), "h", idle_s=0.1)
    meter.start()
    meter.stop()
    assert meter.source == "nvml power" and meter.idle_power_w == pytest.approx(150.0, rel=1e-2)


STUB_NVML = """import time
_T0 = time.time()
class NVMLError(Exception): pass
class _Mem:
    def __init__(self, used): self.used = used
def nvmlInit(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetUUID(h): return 'GPU-ABC-1'
def nvmlDeviceGetMemoryInfo(h): return _Mem(1000)
def nvmlDeviceGetPowerUsage(h): return 200_000  # mW
def nvmlDeviceGetTotalEnergyConsumption(h):
    if {counter}:
        return 5_000_000 + 200.0 * (time.time() - _T0) * 1e3  # mJ: 200 W since the driver loaded
    raise NVMLError('NotSupported')
"""


@pytest.mark.parametrize("counter", [True, False])
def test_the_nvml_sampler_process_reads_the_energy(tmp_path, monkeypatch, counter):
    """A GPU cell's NVML sampler process (a stand-in pynvml drawing 200 W) reads the counter on request and
    samples and integrates the power itself: the training process's meter asks it at the boundaries and runs no
    thread of its own; a span of ~0.3 s is ~60 J by the counter, or by integrated power where there is no
    counter; the idle power is 200 W; the power readings come back as the trace, on this process's clock."""
    import threading

    import torch

    from bench.energy import ProcessEnergyMeter, energy_meter
    from bench.profile import NvmlProcessSampler

    (tmp_path / "pynvml.py").write_text(STUB_NVML.format(counter=counter))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sampler = NvmlProcessSampler("abc-1", 0.005).start()
    try:
        meter, reason = energy_meter(torch.device("cuda"), None, idle_s=0.1, sampler=sampler)
        assert isinstance(meter, ProcessEnergyMeter) and reason is None
        polls = lambda: sum(t.name == "snnbench-energy" for t in threading.enumerate())  # noqa: E731
        before, t_start = polls(), time.perf_counter()
        meter.start()
        assert polls() == before  # (earlier tests may have left their own meters' threads)
        got, elapsed = _span_over(meter, 0.3)
        asked, energy = [], sampler.energy
        sampler.energy = lambda: asked.append(1) or energy()  # noqa: E731
        meter.read_both()
        assert len(asked) == 1  # both sources in one request to the sampler process
        meter.stop()
    finally:
        sampler.stop()
    assert meter.source == ("nvml counter" if counter else "nvml power")
    joules = pick(meter, got)
    assert 200.0 * 0.3 * 0.95 <= joules <= 200.0 * elapsed * 1.05
    assert got["power"] == pytest.approx(200.0 * elapsed, rel=0.1)
    assert meter.idle_power_w == pytest.approx(200.0, rel=0.1)
    trace = meter.trace()
    assert len(trace) >= 5 and all(w == 200.0 for _, w in trace)
    assert t_start - 0.5 <= trace[0][0] and trace[-1][0] <= time.perf_counter()


def test_no_energy_source_in_the_sampler_process_is_a_reason(tmp_path, monkeypatch):
    import torch

    from bench.energy import energy_meter
    from bench.profile import NvmlProcessSampler

    (tmp_path / "pynvml.py").write_text(STUB_NVML.format(counter=False).replace(
        "def nvmlDeviceGetPowerUsage(h): return 200_000", "def nvmlDeviceGetPowerUsage(h): raise NVMLError('x')"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sampler = NvmlProcessSampler("abc-1", 0.005).start()
    try:
        meter, reason = energy_meter(torch.device("cuda"), None, sampler=sampler)
    finally:
        sampler.stop()
    assert meter is None and "no energy counter" in reason and "no power readings" in reason


def test_a_sampler_process_that_died_leaves_the_last_readings(tmp_path, monkeypatch):
    """Its energy stays at the last readings and stopping it gives no peak, without an exception in the cell."""
    from bench.profile import NvmlProcessSampler

    (tmp_path / "pynvml.py").write_text(STUB_NVML.format(counter=True))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sampler = NvmlProcessSampler("abc-1", 0.005).start()
    last = sampler.energy()
    assert last["counter"] >= 0 and last["power"] >= 0
    sampler._proc.kill()
    sampler._proc.wait()
    assert sampler.energy() == last
    sampler.stop()
    assert sampler.peak is None and sampler.power_trace == []
