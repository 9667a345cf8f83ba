"""`run --slurm` against a real one-node Slurm (scripts/slurm-local.sh): a job array gives the rows of a local run,
a requeued cell resumes, a cell longer than its time limit is requeued until it finishes, scancel gives
cancelled and a rerun resubmits.

The cluster is started for this module in a folder of its own, on ports of its own, and its daemons are stopped
(by pid) when the module ends. Without Slurm and root here the tests are skipped, unless SNNBENCH_REQUIRE_SLURM=1
(CI), where that is a failure.
"""

import json
import os
import shutil
import subprocess
import time

import pytest

from reports.results import load_results
from bench.errors import UsageError
from bench.grid import Cell
from bench.slurm import SlurmSettings

from .helpers import REPO, cli, landed, wait_for

pytestmark = pytest.mark.slurm
SCRIPT = REPO / "scripts" / "slurm-local.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    required = os.environ.get("SNNBENCH_REQUIRE_SLURM") == "1"
    can = os.geteuid() == 0 or shutil.which("sbatch")
    if not can:
        if required:
            pytest.fail("SNNBENCH_REQUIRE_SLURM=1 but Slurm is not installed and this is not root")
        pytest.skip("needs root (to install and start a one-node Slurm) or a Slurm here")
    d = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SNNBENCH_SLURM_DIR": str(d), "SNNBENCH_SLURMCTLD_PORT": "6917", "SNNBENCH_SLURMD_PORT": "6918"}
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        msg = f"could not start a one-node Slurm: {r.stderr[-2000:]}"
        pytest.fail(msg) if required else pytest.skip(msg)
    print(f"one-node Slurm started in {time.perf_counter() - t0:.1f} s")
    env["SLURM_CONF"] = str(d / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--user", os.environ.get("USER", "root")], env=env, capture_output=True)
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def grid_file(tmp_path, name, T, epochs, slurm="", seeds=(0,), methods=("bptt_m",)):
    q = lambda xs: "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in xs) + "]"  # noqa: E731
    p = tmp_path / f"{name}.toml"
    p.write_text(f'name = "{name}"\n[axes]\nmethod = {q(methods)}\narch = ["cnn_digits"]\ndataset = ["digits"]\n'
                 f"T = {q(T)}\nseed = {q(seeds)}\n[fixed]\nepochs = {epochs}\nbatch_size = 32\neval_batch_size = 360\n"
                 f"[slurm]\ncpus_per_task = 2\ntimeout_min = 10\n{slurm}")
    return p


def rows(out):
    cells = load_results(out).set_index("key").sort_index()
    epochs = load_results(out, "epochs").sort_values(["key", "epoch"])
    return cells, epochs


def job_of(out, n=0):
    return json.loads((out / "slurm" / "jobs.json").read_text())[n]["job_id"]


def stored_status(out):
    rows = load_results(out)
    return None if rows.empty else rows["status"].iloc[0]


def test_job_array_gives_the_rows_of_a_local_run(slurm, tmp_path):
    """4 cells as one array, packed 2 per task (each still in a fresh worker; 2 CPUs per task, as many threads as
    the local run uses) end with the same accuracy and losses as `run` here; a second run submits nothing. The
    results folder is given relative to where the command runs, as a user types it: the tasks run elsewhere."""
    g = grid_file(tmp_path, "four", T=[1, 2], epochs=2, methods=("bptt_m", "rate_m"), slurm="cells_per_task = 2\n")
    t0 = time.perf_counter()
    r = cli("run", str(g), "--slurm", "--out", "slurm", "--poll-s", "1", env=slurm, timeout=600, cwd=tmp_path)
    print(f"4-cell array: {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 0, r.stderr
    assert "submitted 4 cell(s) as 2 Slurm task(s)" in r.stderr
    logs = list((tmp_path / "slurm" / "logs").glob("*.log"))
    assert len(logs) == 4  # one worker (and its log) per cell
    # each task's fork server forked its workers: the second cell of a task starts in well under the ~2 s a fresh
    # interpreter takes to import torch, and no worker fell back to one
    starts = sorted(load_results(tmp_path / "slurm")["time_start_s"])
    assert starts[1] < 1.0, starts
    assert not any("starting a fresh worker instead" in p.read_text() for p in logs)
    local = cli("run", str(g), "--out", str(tmp_path / "local"), env=slurm, timeout=600)
    assert local.returncode == 0, local.stderr
    (cs, es), (cl, el) = rows(tmp_path / "slurm"), rows(tmp_path / "local")
    assert list(cs.index) == list(cl.index) and (cs["status"] == "ok").all()
    assert cs["acc_top1"].tolist() == cl["acc_top1"].tolist() and cs["acc_top1"].min() > 50
    assert cs["train_loss"].tolist() == cl["train_loss"].tolist()
    assert es["train_loss"].tolist() == el["train_loss"].tolist() and es["test_acc"].tolist() == el["test_acc"].tolist()
    again = cli("run", str(g), "--slurm", "--out", str(tmp_path / "slurm"), env=slurm)
    assert again.returncode == 0 and "4 cell(s) already stored with status ok: skipped" in again.stderr
    assert "submitted 4 cell" not in again.stderr


def test_auto_time_limits_and_packing_come_from_the_plan(slurm, tmp_path):
    """`plan` first, then `run --slurm` with timeout_min=auto and cells_per_task=auto: the cells are packed in the
    grid's order into tasks of at most target_task_min predicted minutes (a task could not take its next cell
    without going over), each task's sbatch script asks its predicted time + 25% + the signal's lead + 2 min (one
    array per limit), and every cell ends ok."""
    import math

    from reports.results import read_plan

    g = grid_file(tmp_path, "auto", T=[1, 2, 4], epochs=1, methods=("bptt_m", "rate_m"))
    out = tmp_path / "out"
    p = cli("plan", str(g), "--out", str(out), env=slurm)
    assert p.returncode == 0, p.stderr
    plan = read_plan(out).set_index("key")
    pred = plan["predicted_cell_wall_s"] + plan["predicted_time_start_s"]
    target_s = max(float(pred.sum()) / 3, float(pred.max()))  # about three tasks of about two cells
    r = cli("run", str(g), "--slurm", "--slurm-set", "timeout_min=auto", "--slurm-set", "cells_per_task=auto",
            "--slurm-set", f"target_task_min={target_s / 60:.6f}", "--out", str(out), "--poll-s", "1",
            env=slurm, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "timeout_min=auto" in r.stderr and "cells_per_task=auto" in r.stderr
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    order = [k for j in jobs for k in j["cells"]]
    assert sorted(order) == sorted(plan.index) and 1 < len(jobs) < len(plan)
    for j, nxt in zip(jobs, jobs[1:] + [None]):
        total = sum(pred[k] for k in j["cells"])
        assert total <= target_s + 1e-6 or len(j["cells"]) == 1
        if nxt is not None:
            assert total + pred[nxt["cells"][0]] > target_s  # packed as full as the target lets it
        want = math.ceil((total * 1.25 + 120) / 60) + 2  # signal_delay_s: 120 (the default)
        assert j["timeout_min"] == want and abs(j["predicted_s"] - total) < 1e-6
        script = next((out / "slurm").glob(f"{j['job_id'].split('_')[0]}*/*_submission.sh")).read_text()
        assert f"#SBATCH --time={want}" in script, script
    assert (load_results(out)["status"] == "ok").all() and len(load_results(out)) == len(plan)


def test_a_two_rank_cell_runs_as_one_slurm_task(slurm, tmp_path):
    """devices=2 on CPU through sbatch: one task starts both gloo ranks (torch.distributed.run inside the job) and
    one row comes back, with the accuracy over the whole test set."""
    g = grid_file(tmp_path, "wide", T=[2], epochs=1)
    out = tmp_path / "out"
    r = cli("run", str(g), "--slurm", "--set", "devices=2", "--set", "train_subset=320", "--out", str(out),
            "--poll-s", "1", env=slurm, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "submitted 1 cell(s) as 1 Slurm task(s)" in r.stderr
    cells, _ = rows(out)
    row = cells.iloc[0]
    assert row["status"] == "ok", row.get("error")
    hits = row["acc_top1"] / 100 * 360  # the whole digits test set, once
    assert row["devices"] == 2 and abs(hits - round(hits)) < 1e-6 and row["acc_top1"] > 0
    assert row["peak_rss_mib_sum"] > row["peak_rss_mib"]


def test_fidelity_cells_wait_for_the_train_cells_they_read(slurm, tmp_path):
    """A train cell that keeps its last weights and a fidelity cell that reads them, sent in one `run --slurm`: the
    fidelity cell's array is submitted with a dependency (afterany) on the train cell's, so it starts after that
    job ends, finds the weights and ends ok."""
    g = tmp_path / "fid.toml"
    g.write_text('name = "fid"\n[axes]\nmethod = ["bptt_m", "rate_m"]\narch = ["cnn_digits"]\ndataset = ["digits"]\n'
                 'T = [2]\nkind = ["train", "fidelity"]\n[fixed]\nepochs = 1\nbatch_size = 32\ntrain_subset = 320\n'
                 'eval_batch_size = 360\nsteps = 2\ntrained_by = "bptt_m"\nweights_at = [0, -1]\n'
                 'save_weights_at = [-1]\n[[exclude]]\nkind = "train"\nmethod = "rate_m"\n'
                 '[[exclude]]\nkind = "fidelity"\nmethod = "bptt_m"\n[slurm]\ncpus_per_task = 2\ntimeout_min = 10\n')
    out = tmp_path / "out"
    r = cli("run", str(g), "--slurm", "--out", str(out), "--poll-s", "1", env=slurm, timeout=600)
    assert r.returncode == 0, r.stderr
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert len(jobs) == 2
    train_array = jobs[0]["job_id"].split("_")[0]
    script = next((out / "slurm").glob(f"{jobs[1]['job_id'].split('_')[0]}*/*submission.sh")).read_text()
    assert f"--dependency=afterany:{train_array}" in script
    cells = load_results(out).set_index("kind")
    assert (cells["status"] == "ok").all(), cells["error"].tolist()
    assert cells.loc["fidelity", "grad_cosine_trained"] > 0.5


def test_scontrol_requeue_resumes_the_cell(slurm, tmp_path):
    """A running 6-epoch cell requeued after its first checkpoint resumes there (restarts = 1) and ends with the
    losses of an uninterrupted local run; while it waits, status says requeued and a second run does not submit."""
    g = grid_file(tmp_path, "requeue", T=[4], epochs=6)
    out = tmp_path / "out"
    r = cli("run", str(g), "--slurm", "--detach", "--out", str(out), env=slurm)
    assert r.returncode == 0 and "detached" in r.stderr, r.stderr
    wait_for(lambda: landed(out / "checkpoints", "*.pt"), what="a checkpoint")
    job = job_of(out)
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
    wait_for(lambda: landed(out / "cells", "*.parquet"), what="the preempted row")
    s = cli("status", str(out), env=slurm)
    assert "requeued" in s.stdout or "running" in s.stdout, s.stdout  # pending again, or already restarted
    w = cli("run", str(g), "--slurm", "--out", str(out), "--poll-s", "1", env=slurm, timeout=600)
    assert w.returncode == 0, w.stderr
    assert "pending or running under Slurm" in w.stderr and "submitted 1 cell" not in w.stderr
    local = cli("run", str(g), "--out", str(tmp_path / "local"), env=slurm, timeout=600)
    assert local.returncode == 0, local.stderr
    (cs, es), (cl, el) = rows(out), rows(tmp_path / "local")
    row = cs.iloc[0]
    assert row["status"] == "ok" and row["restarts"] == 1
    resumed = json.loads(row["resumed_at"])[0]
    print(f"requeue transcript: job {job}, stopped and resumed at epoch {resumed['epoch']} batch {resumed['batch']} "
          f"of 6 epochs, restarts {row['restarts']}, epochs stored {es['epoch'].tolist()}")
    assert resumed["epoch"] >= 2
    assert es["train_loss"].tolist() == el["train_loss"].tolist() and row["acc_top1"] == cl.iloc[0]["acc_top1"]
    assert not any((out / "checkpoints").iterdir())


def test_cell_longer_than_its_time_limit_is_requeued_and_finishes(slurm, tmp_path):
    """A 1-minute limit with USR2 30 s ahead: each run of the task gets under a minute, the cell needs more (T=8,
    70 epochs: ~80 s of training on 2 cores), so it goes on over requeues from its checkpoints. slurmctld looks at
    its jobs' time limits every 30 s or so, so the USR2 comes anywhere from 30 s to the limit after the start: a
    cell that needs less than the limit (40 epochs, ~45 s, before) could end before the signal came, and did once
    in CI (restarts 0, 48.7 s)."""
    epochs = 70
    g = grid_file(tmp_path, "timelimit", T=[8], epochs=epochs, slurm="signal_delay_s = 30\n")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = cli("run", str(g), "--slurm", "--slurm-set", "timeout_min=1", "--out", str(out), "--poll-s", "1",
            env=slurm, timeout=900)
    print(f"time-limit cell: {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 0, r.stderr
    cs, es = rows(out)
    row = cs.iloc[0]
    assert row["status"] == "ok" and row["restarts"] >= 1 and es["epoch"].tolist() == list(range(1, epochs + 1))
    log = "".join(p.read_text() for p in (out / "slurm").glob("*/*.out"))
    assert "this job is timed-out" in log and "Requeued job" in log
    # USR2 can come in the task's first second (Slurm sends it up to a minute early): the task starts through
    # bench.slurm_boot, which keeps it (test_a_warning_signal_before_submitits_handler_is_not_lost)
    script = next((out / "slurm").glob("*/*_submission.sh")).read_text()
    assert "-m bench.slurm_boot -u -m submitit.core._submit" in script


def test_scancel_stores_cancelled_and_a_rerun_resubmits_and_resumes(slurm, tmp_path):
    g = grid_file(tmp_path, "cancel", T=[4], epochs=6)
    out = tmp_path / "out"
    assert cli("run", str(g), "--slurm", "--detach", "--out", str(out), env=slurm).returncode == 0
    wait_for(lambda: landed(out / "checkpoints", "*.pt"), what="a checkpoint")
    subprocess.run(["scancel", job_of(out)], env=slurm, check=True)
    wait_for(lambda: stored_status(out) == "cancelled", what="the cancelled row")
    s = cli("status", str(out), env=slurm)
    assert "1 cancelled" in s.stdout, s.stdout
    r = cli("run", str(g), "--slurm", "--out", str(out), "--poll-s", "1", env=slurm, timeout=600)
    assert r.returncode == 0 and "submitted 1 cell(s)" in r.stderr, r.stderr
    row = load_results(out).iloc[0]
    assert row["status"] == "ok" and row["restarts"] == 1


def test_bad_slurm_input_is_one_message_and_exit_2(slurm, tmp_path):
    g = grid_file(tmp_path, "bad", T=[1], epochs=1)
    r = cli("run", str(g), "--slurm", "--slurm-set", "partition=nosuch", "--out", str(tmp_path / "o"), env=slurm)
    assert r.returncode == 2 and "sbatch refused the job array" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("run", str(g), "--slurm", "--slurm-set", "gpu=1", "--out", str(tmp_path / "o"), env=slurm)
    assert r.returncode == 2 and "unknown Slurm setting 'gpu'" in r.stderr


# ---------------------------------------------------------------- without a cluster


def test_settings_ask_no_gpu_for_cpu_cells_and_check_their_values():
    cpu = [Cell("bptt_m", "cnn_digits", "digits", 1)]
    gpu = [Cell("bptt_m", "cnn_digits", "digits", 1, device="cuda")]
    p = SlurmSettings.make({}, {}, cpu).executor_parameters()
    assert "gpus_per_node" not in p and p["cpus_per_task"] == 2  # the gres error of a GPU-less node
    p = SlurmSettings.make({"partition": "gpu", "mem_gb": 32}, {"timeout_min": "60"}, gpu).executor_parameters()
    assert p["gpus_per_node"] == 1 and p["slurm_partition"] == "gpu" and p["timeout_min"] == 60 and p["mem_gb"] == 32
    for bad in ({"timeout_min": 0}, {"cells_per_task": "two"}, {"additional": 3}, {"gpus": 1}):
        with pytest.raises(UsageError):
            SlurmSettings.make(bad, {}, cpu)


def test_a_multi_device_cell_asks_its_gpus_in_one_task():
    """A cell on 8 GPUs: its task asks 8 GPUs and 8 CPUs each, unless the grid says otherwise; a grid asking fewer
    GPUs than a cell's devices is refused; 1-device cells of the same grid get their own, smaller tasks."""
    wide = Cell("rate_m", "sew_resnet34", "imagenet", 4, batch_size=512, device="cuda", devices=8)
    narrow = Cell("rate_m", "sew_resnet34", "imagenet", 4, batch_size=512, device="cuda")
    s = SlurmSettings.make({"mem_gb": 256}, {}, [wide, narrow])
    p = s.executor_parameters()
    assert p["gpus_per_node"] == 8 and p["cpus_per_task"] == 64 and p["tasks_per_node"] == 1
    p1 = s.for_devices(1, gpu=True).executor_parameters()
    assert p1["gpus_per_node"] == 1 and p1["cpus_per_task"] == 8 and p1["mem_gb"] == 256
    assert SlurmSettings.make({"cpus_per_task": 32}, {}, [wide]).executor_parameters()["cpus_per_task"] == 32
    with pytest.raises(UsageError, match="needs 8 GPUs; gpus_per_node is 4"):
        SlurmSettings.make({"gpus_per_node": 4}, {}, [wide])
    cpu2 = Cell("bptt_m", "cnn_digits", "digits", 1, batch_size=32, devices=2)
    p = SlurmSettings.make({}, {}, [cpu2]).executor_parameters()
    assert "gpus_per_node" not in p and p["cpus_per_task"] == 4


def test_no_sbatch_is_one_message(tmp_path):
    g = grid_file(tmp_path, "nosbatch", T=[1], epochs=1)
    r = cli("run", str(g), "--slurm", "--out", str(tmp_path / "o"), env={"PATH": str(tmp_path)})
    assert r.returncode == 2 and "no sbatch on PATH" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_warning_signal_before_submitits_handler_is_not_lost(tmp_path):
    """Slurm may send USR2 up to a minute early, while the task is still importing: bench.slurm_boot notes it
    and SlurmTask re-raises it once submitit's handler is in place. A stand-in for submitit's entry point gets
    USR2 before it installs its handler: through slurm_boot its handler still runs; started plainly, the
    process dies of the signal."""
    import signal
    import sys

    (tmp_path / "fake_submit.py").write_text(
        "import os, signal, sys\n"
        "os.kill(os.getpid(), signal.SIGUSR2)  # arrives during 'imports'\n"
        "signal.signal(signal.SIGUSR2, lambda s, f: print('handled', sys.argv[1:], flush=True))\n"
        "from bench.slurm_boot import redeliver\n"
        "redeliver()\n"
        "print('done', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    boot = subprocess.run([sys.executable, "-u", "-m", "bench.slurm_boot", "-u", "-m", "fake_submit", "FOLDER"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert boot.returncode == 0 and boot.stdout.split("\n")[:2] == ["handled ['FOLDER']", "done"], boot
    plain = subprocess.run([sys.executable, "-u", "-m", "fake_submit", "FOLDER"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert plain.returncode == -signal.SIGUSR2

