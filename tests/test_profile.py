import time

import torch

from bench.profile import Sampler, SavedTensorsMeter, TimingProbe, _norm_uuid, nvml_device


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
    assert _norm_uuid("GPU-ABC-123") == _norm_uuid("abc-123") == "abc-123"


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
