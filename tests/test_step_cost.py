"""benchmarks/step_cost.py is a front end of the profile grid: its table is the stored rows, through the harness."""

import subprocess
import sys

from reports.results import load_results

from .helpers import REPO


def test_step_cost_prints_the_rows_the_harness_stored(tmp_path):
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_cost.py"), "--set", "arch=cnn_digits",
                        "--set", "steps=2", "--set", "batch_size=4", "--filter", "method=bptt_m,rate_m", "--filter", "T=1,2",
                        "--device", "cpu", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    df = load_results(out).set_index(["method", "T"])
    assert len(df) == 4 and (df["kind"] == "profile").all()
    lines = {tuple(c.strip() for c in l.strip("|").split("|")[:2]): [c.strip() for c in l.strip("|").split("|")]
             for l in r.stdout.splitlines() if l.startswith("| bptt_m") or l.startswith("| rate_m")}
    for (m, T), row in lines.items():
        assert row[4] == f"{df.loc[(m, int(T)), 'saved_for_backward_mib']:.2f}"
        assert row[2] == f"{df.loc[(m, int(T)), 'step_time_ms_median']:.1f}"
    assert float(lines[("bptt_m", "2")][5]) > 1.5 and lines[("rate_m", "2")][5] == "1.000"
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_cost.py"), "--filter", "method=nope"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr and "Traceback" not in bad.stderr
