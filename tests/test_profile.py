import time

import pytest

import torch

from bench.sampler import norm_uuid
from bench.profile import Sampler, SavedTensorsMeter, TimingProbe, nvml_device


def test_sampler_peak_and_baseline_with_injected_reader():
    values = iter([100, 130, 400, 250] + [120] * 10000)
    s = Sampler(lambda: next(values), interval_s=0.001)
    s.start()
    time.sleep(0.05)
    s.stop()
    assert s.baseline == 100
    assert s.peak == 400
    assert s.peak_above_baseline == 300
    assert len(s.samples) >= 5 and all(v >= 100 for _, v in s.samples)
    ts = [t for t, _ in s.samples]
    assert ts == sorted(ts)


def test_sampler_interval_is_at_most_10ms():
    n = [0]

    def read():
        n[0] += 1
        return n[0]

    with Sampler(read, interval_s=0.005):
        time.sleep(0.2)
    assert n[0] >= 20  # at least one reading per 10 ms


def test_sampler_without_readings_reports_none():
    s = Sampler(lambda: None, interval_s=0.001).start()
    s.stop()
    assert s.peak is None and s.peak_above_baseline is None


def test_nvml_on_cpu_gives_a_reason():
    dev, reason = nvml_device(torch.device("cpu"))
    assert dev is None and reason


def test_uuid_normalisation():
    assert norm_uuid("GPU-ABC-123") == norm_uuid(b"abc-123") == "abc-123"


def test_timing_probe_sums_repeated_phases():
    p = TimingProbe("cpu")
    for _ in range(3):
        with p.phase("forward"):
            time.sleep(0.002)
    with p.phase("backward"):
        pass
    out = p.end_step()
    assert out["forward"] >= 6.0 and set(out) == {"forward", "backward"}


def test_saved_meter_counts_storage_once_and_frees():
    w = torch.randn(100, 100, requires_grad=True)
    x = torch.randn(64, 100)
    with SavedTensorsMeter(exclude=[w]) as m:
        a = x @ w  # mm saves x (w is excluded)
        b = a.sin()  # saves a
        c = b * a  # saves b, and a again: the same storage counts once
        loss = c.sum()
    assert m.packed >= 4
    assert m.peak_bytes == 3 * 64 * 100 * 4
    loss.backward()
    del loss, a, b, c
    assert m.current_bytes == 0


def test_nvml_sampler_process_with_a_stub_nvml(tmp_path, monkeypatch):
    """The NVML sampler process, driven by a stand-in pynvml: ready line, baseline, peak, series."""
    from bench.profile import NvmlProcessSampler

    (tmp_path / "pynvml.py").write_text(
        "import itertools\n"
        "_values = itertools.chain([1000, 1500, 4000, 2500], itertools.repeat(1200))\n"
        "class NVMLError(Exception): pass\n"
        "class _Mem:\n"
        "    def __init__(self, used): self.used = used\n"
        "def nvmlInit(): pass\n"
        "def nvmlDeviceGetCount(): return 2\n"
        "def nvmlDeviceGetHandleByIndex(i): return i\n"
        "def nvmlDeviceGetUUID(h): return ['GPU-other', 'GPU-ABC-1'][h]\n"
        "def nvmlDeviceGetMemoryInfo(h):\n"
        "    assert h == 1\n"
        "    return _Mem(next(_values))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    s = NvmlProcessSampler("abc-1", 0.002).start()
    time.sleep(0.1)
    s.stop()
    assert s.baseline == 1000 and s.peak == 4000 and s.peak_above_baseline == 3000
    assert len(s.samples) >= 10 and [v for _, v in s.samples[:4]] == [1500, 4000, 2500, 1200]  # the first reading is the baseline
    with pytest.raises(RuntimeError, match="did not start"):
        NvmlProcessSampler("no-such-gpu", 0.002).start()


def test_bounded_series_keeps_the_whole_run_and_every_peak():
    """200,000 readings with a late peak and an early trough: the kept points span the whole run, hold the exact
    max and min, stay within the bound, and each kept point is a reading that was added."""
    from bench.sampler import BoundedSeries

    n = 200_000
    ts = [i * 0.005 for i in range(n)]  # 1000 s of 5 ms readings
    vs = [1000 + (i * 7919) % 97 for i in range(n)]
    vs[190_123] = 5000  # the late peak
    vs[17] = 3
    s = BoundedSeries(max_points=4000, dt=0.005)
    for t, v in zip(ts, vs):
        s.add(t, v)
    pts = s.points()
    assert len(pts) <= 4000 and s.count == n
    assert max(v for _, v in pts) == 5000 and min(v for _, v in pts) == 3
    assert (ts[190_123], 5000) in pts and (ts[17], 3) in pts
    assert pts[0][0] <= 1.0 and pts[-1][0] >= ts[-1] - 2 * s.dt  # the start and the end of the run
    assert [t for t, _ in pts] == sorted(t for t, _ in pts)
    added = set(zip(ts, vs))
    assert all(p in added for p in pts)
    # every bucket of the final width is represented: no gap longer than two buckets
    gaps = [b[0] - a[0] for a, b in zip(pts, pts[1:])]
    assert max(gaps) <= 2 * s.dt + 1e-9


def test_cpu_contention_arithmetic_with_scripted_readers():
    """Machine busy 9 s over a 4 s window of 2 CPUs, this process 5 s, a helper 1 s: others used 3 s = 37.5 %."""
    from bench.profile import CpuContention

    busy, own, helper, clock = iter([100.0, 109.0]), iter([10.0, 15.0]), iter([2.0, 3.0]), iter([50.0, 54.0])
    c = CpuContention(lambda: next(busy), lambda: next(own), lambda: next(helper), n_cpus=2, clock=lambda: next(clock))
    got = c.start().stop()
    assert got == {"contention_cpu_s": 3.0, "contention_cpu_frac": 3.0 / 8.0, "contention_window_s": 4.0}
    none = CpuContention(lambda: None, lambda: 0.0, n_cpus=2).start().stop()
    assert none["contention_cpu_s"] is None and none["contention_cpu_frac"] is None


def test_cpu_contention_sees_another_process():
    """A busy loop in another process during the window: contention counts (most of) the CPU time that process
    reports for itself, and none of this process's own work."""
    import subprocess
    import sys

    from bench.profile import CpuContention

    c = CpuContention().start()
    burner = subprocess.run([sys.executable, "-c", "import time, resource\nt = time.time()\nwhile time.time() - t < 1.5: pass\n"
                             "r = resource.getrusage(resource.RUSAGE_SELF); print(r.ru_utime + r.ru_stime)"],
                            capture_output=True, text=True)
    x = 0
    for i in range(2_000_000):  # this process's own work is not contention
        x += i
    got = c.stop()
    burned = float(burner.stdout)
    assert got["contention_cpu_s"] >= 0.7 * burned, (got, burned)
    assert 0 < got["contention_cpu_frac"] <= 1.0


def test_rss_footprint_equals_what_the_window_allocated():
    """1 GiB of resident memory is in the process before the window; 256 MiB are touched inside it: the footprint
    is those 256 MiB (not the 1 GiB, not the peak RSS), within 10 %."""
    import numpy as np

    from bench.profile import RssFootprint

    before = np.ones(2**30 // 8)  # resident before the window starts
    fp = RssFootprint().start()
    if not fp.resettable:
        pytest.skip("no /proc/self/clear_refs here")
    inside = np.ones(256 * 2**20 // 8)
    del inside
    footprint, peak = fp.stop()
    assert footprint == pytest.approx(256 * 2**20, rel=0.10)
    assert peak >= 2**30 + footprint * 0.9
    del before
