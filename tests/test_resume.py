"""Checkpoint and resume inside a train cell: a cell killed (SIGKILL) or stopped (SIGTERM, SIGUSR1) and run again
ends with exactly the per-epoch losses and accuracy of an uninterrupted run (CPU), and says where it resumed."""

import json
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from reports.results import load_results
from bench.checkpoint import CellCheckpoint
from bench.grid import Cell
from bench.launch import run_in_subprocess
from .helpers import REPO, cli, landed, wait_for

# 45 batches per epoch of the digits; an epoch takes ~0.5 s on 2 cores, so a signal sent when the worker reports
# epoch 2 lands inside that epoch
CELL = Cell(method="bptt_m", arch="cnn_digits", dataset="digits", T=4, epochs=3, batch_size=32, eval_batch_size=360)


def run_worker(cell: Cell, out, sig=signal.SIGTERM, signal_when=None) -> dict:
    """The real worker, as the launcher starts it; ``signal_when``: send ``sig`` the moment that function holds
    (asked every 5 ms beside the worker; its progress reports come every 0.2 s, and an epoch of these cells can take
    less)."""
    import threading
    import time

    cmd = [sys.executable, "-m", "bench.worker", "--out", str(out), "--cell", json.dumps(cell.config())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    status, sent = {}, None
    if signal_when is not None:
        def watch() -> None:
            nonlocal sent
            while proc.poll() is None:
                if signal_when():
                    proc.send_signal(sig)
                    sent = {"when": "signal_when"}
                    return
                time.sleep(0.005)

        threading.Thread(target=watch, daemon=True).start()
    for line in proc.stdout:
        if line.startswith("@snnbench-progress "):
            msg = json.loads(line.split(" ", 1)[1])
            if "status" in msg:
                status = msg
    status["rc"] = proc.wait()
    status["sent_at"] = sent
    return status


def a_moment_after(cond, seconds: float = 0.03):
    """A ``signal_when`` that holds ``seconds`` after ``cond`` first did: after epoch 1's checkpoint is on disk, a few
    steps into epoch 2 (a stop right at the checkpoint would stop at batch 0, before epoch 2 takes a step)."""
    import time

    since = []

    def check() -> bool:
        if not since:
            if cond():
                since.append(time.perf_counter())
            return False
        return time.perf_counter() - since[0] >= seconds
    return check


def stored(out, key):
    cell = pd.read_parquet(out / "cells" / f"{key}.parquet").iloc[0]
    ep = out / "epochs" / f"{key}.parquet"
    return cell, (pd.read_parquet(ep).sort_values("epoch") if ep.exists() else None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same cell run once, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    assert run_worker(CELL, out)["status"] == "ok"
    return stored(out, CELL.key)


def assert_same_training(a, b):
    (ca, ea), (cb, eb) = a, b
    assert ea["train_loss"].tolist() == eb["train_loss"].tolist()  # exactly: the same arithmetic in the same order
    assert ea["test_acc"].tolist() == eb["test_acc"].tolist()
    assert ca["acc_top1"] == cb["acc_top1"] and ca["train_loss"] == cb["train_loss"]


def test_sigkill_in_second_epoch_then_rerun_matches_uninterrupted_run(tmp_path, reference):
    # killed the moment epoch 1's checkpoint is on disk (watched every 5 ms): inside epoch 2, however fast the steps
    st = run_worker(CELL, tmp_path, sig=signal.SIGKILL, signal_when=CellCheckpoint(tmp_path, CELL.key).exists)
    assert st["rc"] == -signal.SIGKILL and "status" not in st or st.get("status") is None
    assert st["sent_at"] is not None
    assert CellCheckpoint(tmp_path, CELL.key).exists()  # the one written at the end of epoch 1
    assert run_worker(CELL, tmp_path)["status"] == "ok"
    cell, epochs = stored(tmp_path, CELL.key)
    assert_same_training((cell, epochs), reference)
    assert cell["restarts"] == 1
    assert json.loads(cell["resumed_at"]) == [{"epoch": 2, "batch": 0}]
    assert not CellCheckpoint(tmp_path, CELL.key).exists()  # removed once the cell ended ok
    # timings count measured steps only: the two warm-up steps of the resumed process are left out too
    assert cell["measured_steps"] == reference[0]["measured_steps"] - CELL.warmup_steps


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_mid_epoch_checkpoints_at_the_next_step_and_resumes_there(tmp_path, reference, sig):
    """The signal goes 30 ms after epoch 1's checkpoint is on disk (watched every 5 ms), so it lands inside epoch 2
    however fast the steps are: at the first progress report past step 55 (every 0.2 s) it came in epoch 3 once
    in CI, where an epoch took under 0.2 s."""
    st = run_worker(CELL, tmp_path, sig=sig, signal_when=a_moment_after(CellCheckpoint(tmp_path, CELL.key).exists))
    assert st["rc"] == 0 and st["status"] == "preempted", st
    cell, epochs = stored(tmp_path, CELL.key)
    assert cell["status"] == "preempted" and epochs is None
    assert f"stopped by {signal.Signals(sig).name} at epoch 2, batch" in cell["error"]
    state = CellCheckpoint(tmp_path, CELL.key).load()
    assert state["epoch"] == 2 and 0 < state["batch"] < 45 and len(state["epochs"]) == 1
    assert run_worker(CELL, tmp_path)["status"] == "ok"
    cell, epochs = stored(tmp_path, CELL.key)
    assert_same_training((cell, epochs), reference)
    assert cell["restarts"] == 1 and json.loads(cell["resumed_at"]) == [{"epoch": 2, "batch": state["batch"]}]
    assert cell["cell_wall_s"] > 0 and epochs["epoch"].tolist() == [1, 2, 3]


def test_timed_checkpoints_inside_an_epoch_and_kept_weights(tmp_path, reference):
    """checkpoint_minutes: a checkpoint inside the epoch, so a SIGKILL loses less than an epoch;
    save_weights_at keeps the weights after the chosen epochs (the checkpoint itself goes when the cell ends)."""
    cell = Cell(**{**CELL.config(), "checkpoint_minutes": 0.001, "save_weights_at": (1, 3)})
    assert cell.key == CELL.key  # neither changes the result, so neither is in the key
    ckpt = CellCheckpoint(tmp_path, cell.key)

    def inside_epoch_2() -> bool:  # a timed checkpoint inside epoch 2 is on disk (not the one at epoch 1's end)
        state = ckpt.load()
        return state is not None and state["epoch"] == 2 and state["batch"] > 0

    st = run_worker(cell, tmp_path, sig=signal.SIGKILL, signal_when=inside_epoch_2)
    assert st["rc"] == -signal.SIGKILL and st["sent_at"] is not None
    state = CellCheckpoint(tmp_path, cell.key).load()
    assert state["epoch"] == 2 and state["batch"] > 0  # written inside epoch 2
    assert run_worker(cell, tmp_path)["status"] == "ok"
    row, epochs = stored(tmp_path, cell.key)
    assert_same_training((row, epochs), reference)
    assert json.loads(row["resumed_at"])[0]["batch"] == state["batch"]
    weights = sorted(p.name for p in (tmp_path / "weights" / cell.key).iterdir())
    assert weights == ["epoch_1.pt", "epoch_3.pt"]
    w3 = torch.load(tmp_path / "weights" / cell.key / "epoch_3.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in w3.values() if v.is_floating_point())
    assert not CellCheckpoint(tmp_path, cell.key).exists()


def test_launcher_treats_preempted_as_to_be_continued(tmp_path):
    """The grid's launcher gets status preempted, stores no failure row, and the rerun resumes."""
    calls = []

    def progress(d):
        calls.append(d)

    procs = []
    st, err = run_in_subprocess(CELL, tmp_path, None, progress, on_start=procs.append)
    assert st == "ok"
    # a worker stopped before it could store anything leaves no failure row behind when a stop was asked
    c2 = Cell(**{**CELL.config(), "seed": 1})
    procs.clear()

    def kill_at_start(p):
        procs.append(p)
        p.kill()

    st, err = run_in_subprocess(c2, tmp_path, None, progress, on_start=kill_at_start, stopping=lambda: True)
    assert st == "preempted" and not (tmp_path / "cells" / f"{c2.key}.parquet").exists()


def test_grid_process_sigterm_reaches_the_worker_exit_75_then_rerun_finishes(tmp_path):
    """SIGTERM to `run_bench.py run` reaches the running worker (it checkpoints), no further cell starts, the run
    exits 75 (to be continued), `status` shows the cell preempted; the same command again finishes the grid."""
    grid = tmp_path / "g.toml"
    grid.write_text('name = "g"\n[axes]\nmethod = ["bptt_m"]\narch = ["cnn_digits"]\ndataset = ["digits"]\nT = [4]\n'
                    "seed = [0, 1]\n[fixed]\nepochs = 3\nbatch_size = 32\neval_batch_size = 360\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "run_bench.py"), "run", str(grid), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for(lambda: landed(out / "checkpoints", "*.pt"), what="a checkpoint", poll_s=0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "1 cell(s) preempted or cancelled (checkpointed), 1 not started (stopped by SIGTERM)" in err
    s = cli("status", str(out))
    assert "1 preempted" in s.stdout and "1 missing" in s.stdout, s.stdout
    r = cli("run", str(grid), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = load_results(out)
    assert sorted(rows["status"]) == ["ok", "ok"] and sorted(rows["restarts"]) == [0, 1]


def test_resumable_loader_continues_the_same_permutation_and_augmentation(tmp_path):
    """A real on-disk dataset with random augmentation (CIFAR-10: crop, flip, AutoAugment, Cutout): the batches of
    an epoch from batch k on equal the tail of the whole epoch, whatever the global RNG did in between."""
    from bench.data import get_loaders
    from .test_datasets import write_cifar

    write_cifar(tmp_path, "cifar10", n_train=10, n_test=3)
    train, _ = get_loaders("cifar10", 3, 3, seed=5, data_root=str(tmp_path))
    whole = list(train.batches(1))
    torch.manual_seed(123)  # the training RNG moves; the augmentation must not depend on it
    tail = list(train.batches(1, start=2))
    assert len(whole) == len(train) > 3 and len(tail) == len(train) - 2
    for (xa, ya), (xb, yb) in zip(whole[2:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = list(train.batches(2))  # another epoch: another order
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(whole, other))
    state = torch.get_rng_state()
    list(train.batches(1))
    assert torch.equal(state, torch.get_rng_state())  # loading leaves the training RNG as it was


def test_contention_of_two_attempts_adds_up():
    from bench.runner import _add_contention

    a = {"contention_cpu_s": 1.0, "contention_cpu_frac": 0.25, "contention_window_s": 2.0}  # 2 CPUs: 1 / (2 * 2)
    b = {"contention_cpu_s": 3.0, "contention_cpu_frac": 0.25, "contention_window_s": 6.0}  # 3 / (6 * 2)
    c = _add_contention(a, b)
    assert c["contention_cpu_s"] == 4.0 and c["contention_window_s"] == 8.0
    assert c["contention_cpu_frac"] == pytest.approx(4.0 / (8.0 * 2))
    assert _add_contention({}, b) == b
