"""`run_bench.py plan`: a grid's cells predicted from probes before they run, then set beside what they measured.

The figures a plan is judged by (wall time within 20% for the median cell and 50% for every cell of the default
grid, the plan's share of the grid's time) are timings: benchmarks/plan_accuracy.py measures and prints them. Here
the deterministic ones are checked against the cells' own measurements (bytes saved for backward, step counts), the
memory prediction against a fresh worker's peak (a predicted out-of-memory, on both sides of the limit), and the
files another reader takes (plan.parquet, the report's table and figure).
"""

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from bench.plan import largest_batch, memory_line, predict, slurm_requeues
from bench.slurm import AUTO, SlurmSettings, auto_timeout_min, parse_slurm_time, task_groups
from bench.cell import Cell
from reports.aggregate import plan_vs_measured
from reports.results import load_results, read_plan

from .helpers import REPO, cli

pytestmark = pytest.mark.slow


def grid(tmp_path, name, body: str):
    p = tmp_path / f"{name}.toml"
    p.write_text(f'name = "{name}"\n' + body)
    return p


def test_plan_then_run_then_report(tmp_path):
    """A plan of four train cells (no cell run yet), the cells run, the report's plan section: the saved bytes
    predicted are the ones measured, each cell's steps are the registry's sizes over the batch, and the report's
    table and figure carry the plan's and the rows' figures. Planned again, the stored cells count as measured."""
    g = grid(tmp_path, "four", '[axes]\nmethod = ["bptt_m", "rate_m"]\nT = [1, 2]\n[fixed]\narch = "cnn_digits"\n'
             'dataset = "digits"\nepochs = 2\nbatch_size = 32\neval_batch_size = 360\ndevice = "cpu"\n')
    out = tmp_path / "res"
    r = cli("plan", str(g), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "4 step configuration(s) to probe for 4 cell(s)" in r.stderr
    plan = read_plan(out)
    assert len(plan) == 4 and (plan["source"] == "probed").all()
    assert (plan["predicted_steps"] == 2 * math.ceil(1437 / 32)).all()  # the digits split: 1437 training samples
    for col in ("predicted_cell_wall_s", "predicted_step_time_ms_median", "predicted_saved_for_backward_mib",
                "predicted_peak_rss_mib"):
        assert plan[col].notna().all() and (plan[col] > 0).all(), col
    parts = plan[[c for c in plan if c.startswith("predicted_time_") and c != "predicted_time_start_s"]]
    assert (parts.sum(axis=1) - plan["predicted_cell_wall_s"]).abs().max() < 1e-9  # the wall is its parts
    for label in plan["label"]:
        assert label in r.stdout
    assert "4 cell(s):" in r.stdout and "device-hour" in r.stdout

    run = cli("run", str(g), "--out", str(out))
    assert run.returncode == 0, run.stderr
    # with a plan in the folder, the run's ETA is the plan's seconds from its first line on
    first = next(ln for ln in run.stderr.splitlines() if ln.startswith("[0/4 done") and "ETA" in ln)
    m, sec = re.search(r"ETA (\d+)m(\d+)s", first).groups()
    total = float((plan["predicted_cell_wall_s"] + plan["predicted_time_start_s"]).sum())
    assert abs(int(m) * 60 + int(sec) - total) <= 1.5, (first, total)
    cells = load_results(out)
    cmp = plan_vs_measured(read_plan(out), cells)
    assert len(cmp) == 4
    # the bytes autograd saves depend on the configuration alone: the probe's memory step is the cell's
    assert (cmp["error_saved_mib_pct"].abs() < 2.0).all(), cmp[["cell", "predicted_saved_mib", "measured_saved_mib"]]
    # the peak resident memory of the probe's worker is a fresh cell worker's, within a few percent
    assert (cmp["error_memory_pct"].abs() < 10.0).all(), cmp[["cell", "predicted_memory_mib", "measured_memory_mib"]]

    rep = cli("report", str(out))
    assert rep.returncode == 0, rep.stderr
    md = (out / "report" / "summary.md").read_text()
    assert "## Plan against measurement" in md and "4 cell(s) planned and measured" in md
    for row in cmp.itertuples():
        assert f"{row.measured_wall_s:.2f}" in md and f"{row.predicted_wall_s:.2f}" in md
    from reports.figures import fig_plan

    fig, _ = fig_plan(cmp, out=tmp_path / "figs")
    pts = [c for c in fig.axes[0].collections if c.get_gid() == "cells"][0].get_offsets()
    assert sorted(map(tuple, pts.tolist())) == sorted(zip(cmp["measured_wall_s"], cmp["predicted_wall_s"]))

    again = cli("plan", str(g), "--out", str(out))
    assert again.returncode == 0 and "4 cell(s) stored ok by this code" in again.stderr
    plan2 = read_plan(out).set_index("key")
    assert (plan2["source"] == "measured").all()
    meas = cells.set_index("key")
    assert (plan2["predicted_cell_wall_s"] == meas.loc[plan2.index, "cell_wall_s"]).all()


def test_plan_needs_no_dataset_file(tmp_path):
    """A CIFAR-10 cell is planned without --data-root: random input of its shape, its steps from the registry."""
    g = grid(tmp_path, "cifar", '[axes]\nmethod = ["bptt_m"]\n[fixed]\narch = "cnn_digits"\ndataset = "cifar10"\n'
             'T = 1\nepochs = 3\nbatch_size = 128\neval_batch_size = 500\ndevice = "cpu"\n'
             'arch_options = { widths = [4, 4, 4] }\n')
    r = cli("plan", str(g), "--out", str(tmp_path / "res"))
    assert r.returncode == 0, r.stderr
    plan = read_plan(tmp_path / "res")
    assert plan["predicted_steps"].tolist() == [3 * math.ceil(50000 / 128)]
    assert plan["source"].tolist() == ["probed"]


def test_a_predicted_out_of_memory_holds_on_both_sides(tmp_path):
    """A grid whose [slurm] mem_gb is less than its cell needs: the plan flags the cell with the largest batch that
    fits, and fresh workers confirm both sides: the cell at its batch goes above the limit, at the batch the plan
    names it stays below."""
    body = ('[axes]\nmethod = ["bptt_m"]\n[fixed]\narch = "cnn_digits"\ndataset = "digits"\nT = 16\nepochs = 3\n'
            'batch_size = 1024\neval_batch_size = 64\ndevice = "cpu"\nwarmup_steps = 0\n')
    free = grid(tmp_path, "free", body)
    assert cli("plan", str(free), "--out", str(tmp_path / "p0"), "--memory-mib", "1e9", "--memory-line").returncode == 0
    p0 = read_plan(tmp_path / "p0").iloc[0]
    a, b = p0["memory_intercept_mib"], p0["memory_per_sample_mib"]
    assert b > 0
    limit = a + b * 768  # between the probe's two batch sizes (512 and 1024)
    tight = grid(tmp_path, "tight", body + f"[slurm]\nmem_gb = {limit / 1024:.6f}\n")
    r = cli("plan", str(tight), "--out", str(tmp_path / "p1"))
    assert r.returncode == 0, r.stderr
    p1 = read_plan(tmp_path / "p1").iloc[0]
    assert p1["fits"] == False and p1["memory_limit_from"] == "the grid's [slurm] mem_gb"  # noqa: E712
    fit = int(p1["max_batch_size"])  # this plan's own line (its probe measured again) at 85% of the limit
    assert fit == math.floor((0.85 * limit - p1["memory_intercept_mib"]) / p1["memory_per_sample_mib"])
    assert 128 <= fit < 1024, fit
    assert f"OOM: batch <= {fit} fits" in r.stdout and "predicted not to fit" in r.stdout
    # what fresh cell workers measure at the two batch sizes
    for batch, above in ((1024, True), (fit, False)):
        out = tmp_path / f"run{batch}"
        assert cli("run", str(free), "--out", str(out), "--set", f"batch_size={batch}").returncode == 0
        peak = load_results(out)["peak_rss_mib"].iloc[0]
        print(f"batch {batch}: peak {peak:.0f} MiB, limit {limit:.0f} MiB (predicted fit {fit})")
        assert (peak > limit) if above else (peak <= limit), (batch, peak, limit)


def test_a_stopped_plan_leaves_no_process(tmp_path):
    """SIGTERM to `plan` while a probe runs: the command ends, and its fork server and probe with it."""
    g = grid(tmp_path, "two", '[axes]\nmethod = ["bptt_m", "rate_m"]\n[fixed]\narch = "cnn_digits"\n'
             'dataset = "digits"\nT = 8\nbatch_size = 512\ndevice = "cpu"\n')
    proc = subprocess.Popen([sys.executable, str(REPO / "run_bench.py"), "plan", str(g), "--out", str(tmp_path / "o")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    for line in proc.stderr:
        if line.startswith("probe 1/"):
            break
    kids = psutil.Process(proc.pid).children(recursive=True)
    assert kids, "a fork server and its probe"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    _, alive = psutil.wait_procs(kids, timeout=15)
    assert not alive, [p.cmdline()[:3] for p in alive]


def test_plan_bad_input_is_one_message(tmp_path):
    for args, msg in ((["plan", "no_such_grid"], "no_such_grid"), (["plan", "default", "--memory-mib", "-5"], "--memory-mib")):
        r = cli(*args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_auto_slurm_settings_need_a_plan(tmp_path):
    """timeout_min=auto without plan.parquet: one message before anything is submitted (sbatch is not reached)."""
    g = grid(tmp_path, "g", '[axes]\nmethod = ["bptt_m"]\n[fixed]\narch = "mlp"\ndataset = "digits"\nT = 1\n')
    r = cli("run", str(g), "--slurm", "--slurm-set", "timeout_min=auto", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "plan.parquet" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- the arithmetic, against hand-worked figures


def test_memory_line_and_largest_batch():
    p = {"memory_at": [[16, 100 * 2**20], [32, 132 * 2**20]]}
    a, b = memory_line(p)
    assert (a / 2**20, b / 2**20) == (68.0, 2.0)
    # 85% of 100 MiB for resident memory: (85 - 68) / 2 = 8.5; 95% for CUDA's allocator: 13.5
    assert largest_batch({"memory_intercept_mib": 68.0, "memory_per_sample_mib": 2.0}, "peak_rss_mib", 100.0) == 8
    assert largest_batch({"memory_intercept_mib": 68.0, "memory_per_sample_mib": 2.0}, "peak_alloc_mib", 100.0) == 13
    assert largest_batch({"memory_intercept_mib": 68.0, "memory_per_sample_mib": 2.0}, "peak_rss_mib", 60.0) is None


def test_predicted_wall_is_the_sum_of_its_parts():
    """One train cell from a hand-made probe: 45 batches x 3 epochs, 2 warm-up steps, evaluation of 360 samples
    in one batch of 360 (cold once, analyses once), 2 epoch-end checkpoints."""
    cell = Cell(method="bptt_m", arch="cnn_digits", dataset="digits", T=1, epochs=3, batch_size=32,
                eval_batch_size=360, warmup_steps=2)
    probe = {"parts": {"device": 0.1, "meters": 0.2, "model": 0.3, "data": 0.4, "warmup": 0.06}, "step_ms": [9, 10, 11],
             "data_wait_ms": [1.0, 1.0], "eval_cold_s": 0.5, "eval_batch_s": 0.2, "analyses_batch_s": 0.3,
             "checkpoint_s": 0.05, "store_s": 0.07, "saved_bytes": 2**20, "start_s": 0.04,
             "memory_at": [[16, 2**29], [32, 2**29 + 2**28]], "peaks": {"start": 2**29, "train": 2**30, "eval": 2**28}}
    row = predict(cell, probe)
    steps = 45 * 3
    assert row["predicted_steps"] == steps
    assert math.isclose(row["predicted_time_steps_s"], (steps - 3) * 0.010)
    assert math.isclose(row["predicted_time_data_s"], 0.4 + steps * 0.001)
    assert math.isclose(row["predicted_time_eval_s"], 0.5 - 0.2 + 3 * 0.2 + 0.3 - 0.2)
    assert math.isclose(row["predicted_time_checkpoint_s"], 2 * 0.05)
    # a warm batch timed slower than the cold one (the machine's load) is bounded by the cold one
    slow = predict(cell, {**probe, "eval_batch_s": 0.9})
    assert math.isclose(slow["predicted_time_eval_s"], 0.5 - 0.5 + 3 * 0.5 + 0.3 - 0.5)
    assert math.isclose(row["predicted_cell_wall_s"], 0.1 + 0.2 + 0.3 + 0.4 + steps * 0.001 + 0.06 + (steps - 3) * 0.010
                        + 0.5 - 0.2 + 3 * 0.2 + 0.3 - 0.2 + 0.1 + 0.07)
    assert row["predicted_saved_for_backward_mib"] == 1.0 and row["predicted_peak_rss_mib"] == 1024.0
    # the line: slope (768 - 512) / 16 MiB a sample, through the highest stretch's peak at 32 (resident memory: an
    # evaluation's peak rises with the batch too, so it has no column of its own)
    assert (row["memory_per_sample_mib"], row["memory_intercept_mib"], row["eval_peak_mib"]) == (16.0, 512.0, None)
    # on CUDA the evaluation's allocator peak stands apart, and the line runs through the training's
    cuda = predict(cell, {**probe, "device_type": "cuda", "peaks": {"start": 2**29, "train": 2**30, "eval": 2**31}})
    assert (cuda["memory_per_sample_mib"], cuda["memory_intercept_mib"], cuda["eval_peak_mib"]) == (16.0, 512.0, 2048.0)
    assert largest_batch(cuda, "peak_alloc_mib", 2048.0) is None  # the evaluation alone does not fit


def test_a_fidelity_cells_search_for_weights_grows_with_the_folder():
    """A fidelity cell at initialisation and at the trained cell's last epoch: its steps are both methods' for each
    set of weights, and its search for the weights reads every row the folder holds when it starts (all other
    cells run first) before loading one weights file."""
    from bench.plan import rows_when_run

    fid = Cell(method="rate_m", arch="cnn_digits", dataset="digits", T=2, kind="fidelity", steps=4, weights_at=[0, -1])
    probe = {"parts": {}, "step_ms": [10.0], "lookup_first_s": 0.03, "lookup_row_s": 0.005, "weights_load_s": 0.002}
    row = predict(fid, probe, {"step_ms": [30.0]}, rows_before=40)
    assert math.isclose(row["predicted_time_steps_s"], 4 * 2 * (0.010 + 0.030))
    assert math.isclose(row["predicted_time_checkpoint_s"], 0.03 + 39 * 0.005 + 0.002)
    at_init = predict(Cell(**{**fid.config(), "weights_at": [0]}), probe, None, rows_before=40)
    assert at_init["predicted_time_checkpoint_s"] == 0.0  # nothing to search for
    train = [Cell(method=m, arch="cnn_digits", dataset="digits", T=2, epochs=1) for m in ("bptt_m", "rate_m")]
    fids = [fid, Cell(**{**fid.config(), "T": 4})]
    # 3 rows stored now, one of them a cell about to run again (its file is replaced, not added)
    counts = rows_when_run({"a", "b", train[0].key}, [fids[0], train[0], fids[1], train[1]])
    assert counts == {fids[0].key: 4, fids[1].key: 5}


def test_slurm_time_limits_from_a_plan():
    assert [parse_slurm_time(t) for t in ("UNLIMITED", "infinite", "1-00:00:00", "04:00:00", "30:00", "45", "2-12")] \
        == [None, None, 1440, 240, 30, 45, 3600]
    # predicted 10 min: +25%, + the 120 s signal lead, + 2 min -> ceil(12.5 + 2) + 2 = 17; capped by a partition
    assert auto_timeout_min(600, 120) == 17 and auto_timeout_min(600, 120, cap_min=15) == 15
    assert slurm_requeues(3 * 3600, 60, 120) == 3 and slurm_requeues(100, 60, 120) == 0


def test_cells_per_task_auto_packs_in_order():
    cells = [Cell(method="bptt_m", arch="mlp", dataset="digits", T=t) for t in range(1, 7)]
    pred = dict(zip([c.key for c in cells], [20, 20, 50, 100, 10, 10]))  # seconds
    s = SlurmSettings(cells_per_task=AUTO, target_task_min=1.0)
    groups = task_groups(cells, s, pred)
    assert [[pred[c.key] for c in g] for g in groups] == [[20, 20], [50], [100], [10, 10]]
    assert [len(g) for g in task_groups(cells, SlurmSettings(cells_per_task=4), None)] == [4, 2]
    assert SlurmSettings.make({"timeout_min": "auto"}, {"cells_per_task": "auto"}, cells).cells_per_task == AUTO
    with pytest.raises(Exception, match="int or 'auto'"):
        SlurmSettings.make({"timeout_min": "soon"}, {}, cells)



@contextlib.contextmanager
def memory_cgroup(limit_bytes: int):
    """A child of this process's memory cgroup (v1's memory controller, or v2) limited to ``limit_bytes``, with no
    swap; yields a function that moves the calling process into it (a ``preexec_fn``). Skips where no such cgroup
    can be made (not root, no memory controller)."""
    from bench.plan import memory_cgroups

    swap = {"memory.limit_in_bytes": "memory.memsw.limit_in_bytes", "memory.max": "memory.swap.max"}
    made = None
    for _, own, limit_file in memory_cgroups():
        swap_file = swap[limit_file]
        d = own / f"snnbench-test-{os.getpid()}"
        try:
            d.mkdir()
        except OSError:
            continue
        try:
            (d / limit_file).write_text(str(limit_bytes))
            if (d / swap_file).exists():  # v1: memory and swap together; v2: swap alone
                (d / swap_file).write_text(str(limit_bytes) if swap_file.endswith("_bytes") else "0")
            made = d
            break
        except OSError:
            d.rmdir()
    if made is None:
        pytest.skip("no memory cgroup can be made here (needs root and a memory controller)")

    def enter():
        (made / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield enter
    finally:
        for _ in range(100):  # what is left in it (a fork server on its way out) goes, then the cgroup
            for pid in (made / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                made.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_a_probe_out_of_memory_still_gives_the_largest_batch(tmp_path):
    """The plan in a memory cgroup of 1600 MiB (the limit it reads from its own cgroup): the cell's probe at batch
    1024 is killed by the out-of-memory killer, so the plan probes halved batches until one runs and fits the
    memory's line there. Fresh workers in the same cgroup show both sides: the cell at the largest batch the plan
    names runs ok, at the peak the line puts there (within 10%); at its own batch it is stored as oom."""
    body = ('[axes]\nmethod = ["bptt_m"]\n[fixed]\narch = "cnn_digits"\ndataset = "digits"\nT = 16\nepochs = 1\n'
            'batch_size = 1024\neval_batch_size = 64\ndevice = "cpu"\nwarmup_steps = 0\n')
    g = grid(tmp_path, "big", body)
    limit_mib = 1600

    def in_cgroup(*args):
        return subprocess.run([sys.executable, str(REPO / "run_bench.py"), *map(str, args)], cwd=REPO, text=True,
                              capture_output=True, timeout=600, preexec_fn=enter)
    with memory_cgroup(limit_mib * 2**20) as enter:
        r = in_cgroup("plan", g, "--out", tmp_path / "p")
        assert r.returncode == 0, r.stderr
        p = read_plan(tmp_path / "p").iloc[0]
        assert p["source"] == "probe oom" and "out-of-memory killer" in p["probe_error"]
        assert p["memory_limit_from"] == "the cgroup's memory limit" and p["memory_limit_mib"] == limit_mib
        assert "out of memory at batch 1024: probing batch 512" in r.stderr
        ran, fit = int(p["probe_ran_batch"]), int(p["max_batch_size"])
        assert 1 <= ran < 1024 and 1 <= fit < 1024 and p["fits"] == False  # noqa: E712
        assert p["predicted_peak_rss_mib"] > limit_mib
        assert f"OOM: batch <= {fit} fits" in r.stdout and "without a prediction" in r.stdout
        at_fit = in_cgroup("run", g, "--out", tmp_path / "fit", "--set", f"batch_size={fit}")
        at_own = in_cgroup("run", g, "--out", tmp_path / "own")
    row = load_results(tmp_path / "fit").iloc[0]
    assert at_fit.returncode == 0 and row["status"] == "ok", at_fit.stderr
    line = p["memory_intercept_mib"] + p["memory_per_sample_mib"] * fit
    print(f"probe ran at batch {ran}; largest batch {fit}: measured {row['peak_rss_mib']:.0f} MiB, line {line:.0f} MiB")
    assert abs(row["peak_rss_mib"] - line) <= 0.1 * line, (row["peak_rss_mib"], line)
    own = load_results(tmp_path / "own").iloc[0]
    assert at_own.returncode == 1 and own["status"] == "oom", (at_own.stderr, own["error"])


def test_the_cgroup_memory_limit_is_the_least_up_the_processs_own_path(tmp_path):
    """A fake /sys/fs/cgroup: v1's memory controller with a job's cgroup below its step's, and v2 (hybrid, under
    unified/) with "max" at the leaf: the limit is the least number found up either path; none set, None."""
    from bench.plan import cgroup_memory_limit

    v1 = tmp_path / "memory" / "slurm" / "uid_0" / "job_7"
    v1.mkdir(parents=True)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (tmp_path / "memory" / "slurm" / "uid_0" / "memory.limit_in_bytes").write_text("3000000000\n")
    (v1 / "memory.limit_in_bytes").write_text("4000000000\n")
    v2 = tmp_path / "unified" / "job"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text("max\n")
    (tmp_path / "unified" / "memory.max").write_text("5000000000\n")
    text = "5:memory:/slurm/uid_0/job_7\n4:cpu,cpuacct:/slurm/uid_0/job_7\n0::/job\n"
    assert cgroup_memory_limit(text, tmp_path) == 3000000000
    assert cgroup_memory_limit("0::/job\n", tmp_path) == 5000000000
    (tmp_path / "unified" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit("0::/job\n", tmp_path) is None
    assert cgroup_memory_limit("1:cpu:/\n", tmp_path) is None
