import math

import pytest

from bench.grid import Cell
from bench.runner import run_cell

SMALL = dict(arch="mlp", dataset="digits", T=2, epochs=2, batch_size=64, train_subset=256, warmup_steps=1,
             arch_options={"widths": [32]})


def test_train_cell_row():
    res = run_cell(Cell(method="rate_m", **SMALL))
    r = res.row
    assert r["status"] == "ok", r["error"]
    assert len(res.epochs) == 2 and [e["epoch"] for e in res.epochs] == [1, 2]
    assert 0 <= r["acc_top1"] <= 100 and r["acc_top1_best"] >= r["acc_top1"]
    assert r["measured_steps"] == 2 * 4 - 2  # 4 steps per epoch, minus warm-up and the saved-bytes step
    for c in ("step_time_ms_median", "forward_ms", "backward_ms", "optimizer_ms", "epoch_time_s",
              "throughput_samples_per_s", "peak_rss_mib", "saved_for_backward_mib", "firing_rate_mean"):
        assert r[c] is not None and r[c] > 0, c
    assert r["step_time_ms_p10"] <= r["step_time_ms_median"] <= r["step_time_ms_p90"]
    assert r["forward_ms"] + r["backward_ms"] + r["optimizer_ms"] <= r["step_time_ms_p90"] * 1.05
    # on CPU the GPU columns are null, with the reason stored
    assert r["peak_alloc_mib"] is None and r["peak_nvml_mib"] is None and r["gpu_null_reason"]
    assert r["torch_version"] and r["host"] and r["git_commit"] and r["start_time"]
    assert {s["source"] for s in res.samples} == {"rss"}


def test_same_seed_reproduces_accuracy():
    a = run_cell(Cell(method="bptt_m", seed=3, **SMALL)).epochs
    b = run_cell(Cell(method="bptt_m", seed=3, **SMALL)).epochs
    c = run_cell(Cell(method="bptt_m", seed=4, **SMALL)).epochs
    assert [e["test_acc"] for e in a] == [e["test_acc"] for e in b]
    assert [e["train_loss"] for e in a] == [e["train_loss"] for e in b]
    assert [e["train_loss"] for e in a] != [e["train_loss"] for e in c]


def test_profile_cell():
    res = run_cell(Cell(method="bptt_s", arch="cnn_digits", dataset="synthetic:cifar10", T=2, kind="profile",
                        batch_size=4, warmup_steps=1, steps=3, arch_options={"widths": [4, 4, 4]}))
    r = res.row
    assert r["status"] == "ok", r["error"]
    assert r["measured_steps"] == 3 and r["acc_top1"] is None and r["epoch_time_s"] is None
    assert r["saved_for_backward_mib"] > 0


def test_failure_becomes_a_row():
    res = run_cell(Cell(method="rate_m", **{**SMALL, "arch_options": {"no_such_option": 1}}))
    assert res.status == "error"
    assert "no_such_option" in res.row["error"]
    assert res.row["acc_top1"] is None


def test_a_cell_on_a_numbered_gpu_makes_it_the_current_device(monkeypatch):
    """Whatever names no device (the timing probe's CUDA events, Triton's launches) goes to the current device: a
    cell on cuda:1 must make cuda:1 current before anything runs, or its phase times are read off an idle cuda:0.
    Here set_device stands in for the driver and refuses, which must become the cell's row, not an exception."""
    import torch

    asked = []

    def set_device(d):
        asked.append(torch.device(d))
        raise RuntimeError("no such GPU here")

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    res = run_cell(Cell(method="bptt_m", arch="cnn_digits", dataset="synthetic:cifar10", T=1, kind="profile",
                        batch_size=2, warmup_steps=0, steps=1, device="cuda:1"))
    assert asked == [torch.device("cuda", 1)]
    assert res.status == "error" and res.row["error"] == "device cuda:1: RuntimeError: no such GPU here"


def test_event_frames_profile():
    res = run_cell(Cell(method="rate_s", arch="vggsnn_dvs", dataset="synthetic:cifar10_dvs", T=10, kind="profile",
                        batch_size=2, warmup_steps=0, steps=1))
    assert res.status == "ok", res.row["error"]
    assert math.isfinite(res.row["step_time_ms_median"])


def test_firing_rate_is_of_spikes_with_ottt_scaled_ws(digits_batch):
    """OTTT's scaled-WS option multiplies spikes by 2.74 after each neuron; the stored rate stays a rate: the mean
    over the LIF layers of their spike outputs, counted here by hooks of the test's own."""
    from bench.runner import _FiringRate
    from methods import METHODS, MethodConfig
    from methods.layers import LIF

    x, _ = digits_batch
    method = METHODS["ottt_a"](MethodConfig(T=2, options={"norm": "ws"}))
    model = method.build("cnn_digits", 10, 1)
    means = []
    hooks = [m.register_forward_hook(lambda m, i, o: means.append(o.float().mean().item()))
             for m in model.modules() if isinstance(m, LIF)]
    fr = _FiringRate(model)
    method.infer(model, x)
    rate, calls = fr.close()
    for h in hooks:
        h.remove()
    assert 0.0 < rate < 1.0 and calls == len(means)
    assert rate == pytest.approx(sum(means) / len(means), rel=1e-6)