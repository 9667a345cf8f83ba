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
