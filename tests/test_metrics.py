"""The metric table: statistics of recorded series are computed in one place (summarise), checked here against
the standard library and a brute-force percentile; the runner's row carries every one of them."""

import statistics

import numpy as np
import pytest

from reports.results import METRIC, METRICS, SERIES, _statistic, summarise


def brute_percentile(xs, q):
    """Linear interpolation between closest ranks, written out (numpy's default method)."""
    s = sorted(xs)
    pos = q / 100 * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def test_summarise_matches_independent_statistics():
    steps = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    fwd = [1.0, 2.0, 4.0, 8.0]
    out = summarise({"step_ms": steps, "forward_ms": fwd})
    assert out["step_time_ms_median"] == statistics.median(steps)
    assert out["step_time_ms_p10"] == pytest.approx(brute_percentile(steps, 10), abs=1e-12)
    assert out["step_time_ms_p90"] == pytest.approx(brute_percentile(steps, 90), abs=1e-12)
    assert out["forward_ms"] == statistics.median(fwd) == 3.0
    # series not given are left out (the epoch series is summarised by another call), empty ones are None
    assert "epoch_time_s" not in out and "backward_ms" not in out
    assert summarise({"backward_ms": []}) == {"backward_ms": None}


def test_every_series_metric_names_a_known_series_and_statistic():
    for m in METRICS:
        if m.series is not None:
            assert m.series in SERIES
            _statistic(m.stat or "median")
    for bad in ("p101", "pp", "mode", "p-1"):
        with pytest.raises(ValueError, match="unknown statistic"):
            _statistic(bad)
    assert _statistic("p50")([1.0, 2.0, 3.0, 10.0]) == statistics.median([1.0, 2.0, 3.0, 10.0])


def test_a_profile_row_has_every_step_statistic():
    """The runner's row fills each metric of a step series from the steps it measured: ordered percentiles,
    and as many measured steps as the cell asked for."""
    from bench.grid import Cell
    from bench.runner import run_cell

    row = run_cell(Cell("bptt_m", "cnn_digits", "synthetic:digits", 2, kind="profile", batch_size=8, steps=5,
                        warmup_steps=1)).row
    assert row["status"] == "ok", row["error"]
    assert row["measured_steps"] == 5
    for m in METRICS:
        if m.series and m.series not in ("epoch_s", "data_wait_ms"):
            assert row[m.name] is not None and row[m.name] > 0, m.name
    assert row["step_time_ms_p10"] <= row["step_time_ms_median"] <= row["step_time_ms_p90"]
    assert METRIC["epoch_time_s"].series == "epoch_s" and row["epoch_time_s"] is None  # a profile cell has no epochs
    assert row["data_wait_ms"] is None  # its batches are loaded before the steps: it never waits for one


def test_a_train_row_says_how_long_steps_waited_for_their_batches():
    from bench.grid import Cell
    from bench.runner import run_cell

    res = run_cell(Cell("bptt_m", "cnn_digits", "digits", 1, epochs=1, batch_size=64, train_subset=640, warmup_steps=1))
    waits = res.series["data_wait_ms"]
    assert res.status == "ok" and len(waits) == res.row["measured_steps"] == 8  # 10 steps: 1 warm-up, 1 memory
    assert all(w > 0 for w in waits) and res.row["data_wait_ms"] == pytest.approx(float(np.mean(waits)))
