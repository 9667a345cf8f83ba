"""The history page: runs appended per commit, one plot per metric, regressions marked where a value is worse than
at the previous run by more than the metric's tolerance. Values are read back from the figure's artists."""

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from reports.history import add_run, fig_history, load_history, regressions, render_history
from reports.results import write_cell
from tests.helpers import cli
from tests.test_check import cell_row

# (commit, bptt_m T=4 step ms, rate_m T=4 step ms, bptt_m saved MiB)
RUNS = [("aaaaaaa1", 100.0, 50.0, 10.0), ("bbbbbbb2", 104.0, 50.0, 10.0), ("ccccccc3", 130.0, 49.0, 11.0)]


def write_results(folder: Path, bptt_ms, rate_ms, saved) -> Path:
    for row in (cell_row("bptt_m", 4, step_time_ms_median=bptt_ms, saved_for_backward_mib=saved),
                cell_row("rate_m", 4, step_time_ms_median=rate_ms, saved_for_backward_mib=5.0),
                cell_row("rate_m", 8, step_time_ms_median=rate_ms * 2, saved_for_backward_mib=5.0, status="error")):
        write_cell(folder, row["key"], row)
    return folder


def test_history_plots_each_run_and_marks_regressions(tmp_path):
    hist = tmp_path / "hist"
    for i, (commit, b, r, s) in enumerate(RUNS):
        add_run(hist, write_results(tmp_path / f"res{i}", b, r, s), commit, f"2026-11-0{i + 1}T00:00:00+00:00")
    h = load_history(hist)
    assert sorted(h["order"].unique()) == [0, 1, 2] and len(h) == 6  # the failed cell is not history
    # step time: tolerance 10%: 100 -> 104 is not a regression, 104 -> 130 is; memory (1%): 10 -> 11 is
    bad = h[regressions(h, "step_time_ms_median")]
    assert bad[["method", "T", "commit"]].values.tolist() == [["bptt_m", 4, "ccccccc3"]]
    assert h[regressions(h, "saved_for_backward_mib")]["commit"].tolist() == ["ccccccc3"]
    fig, paths = fig_history(h, "step_time_ms_median", tmp_path / "out")
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert list(lines["bptt_m|4"].get_ydata()) == [100.0, 104.0, 130.0]
    assert list(lines["rate_m|4"].get_ydata()) == [50.0, 50.0, 49.0]
    assert list(lines["regression|bptt_m|4"].get_xdata()) == [2] and "regression|rate_m|4" not in lines
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["aaaaaaa", "bbbbbbb", "ccccccc"]
    plt.close(fig)
    assert all(p.exists() for p in paths)


def test_history_cli_adds_renders_and_report_links_it(tmp_path):
    hist = tmp_path / "hist"
    for i, (commit, b, r, s) in enumerate(RUNS[:2]):
        res = cli("history", str(hist), "--add", str(write_results(tmp_path / f"res{i}", b, r, s)), "--commit", commit)
        assert res.returncode == 0, res.stderr
    page = hist / "history.html"
    text = page.read_text()
    assert "history_step_time_ms_median.png" in text and (hist / "history_step_time_ms_median.png").exists()
    assert "0 regression(s) marked" in text
    rep = cli("report", str(tmp_path / "res1"), "--history", str(hist))
    assert rep.returncode == 0, rep.stderr
    index = (tmp_path / "res1" / "report" / "index.html").read_text()
    assert "href='../../hist/history.html'" in index
    bad = cli("history", str(tmp_path / "empty"))
    assert bad.returncode == 2 and "holds no runs" in bad.stderr
    bad = cli("history", str(hist), "--add", str(tmp_path / "res0"))
    assert bad.returncode == 2 and "--commit" in bad.stderr
    assert isinstance(pd.read_parquet(next((hist / "runs").glob("*.parquet"))), pd.DataFrame)
