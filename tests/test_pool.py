"""Cells side by side: `--gpus` gives each worker one GPU of its own, `--jobs N` runs N CPU train cells at once.

The GPU pool's scheduling is tested with a fake device list (no GPU here): which GPU each cell got, that no two
cells ever held one GPU at once, and that every cell ran once."""

import threading
import time

import pytest

from reports.results import load_results
from bench.errors import UsageError
from bench.grid import Cell
from bench.launch import Slot, check_slots, cpu_slots, gpu_slots, run_pool

from .helpers import cli, tiny_grid


def cells(n, device="cuda", kind="train"):
    return [Cell("bptt_m", "cnn_digits", "digits", 1, seed=i, device=device, kind=kind) for i in range(n)]


def test_gpu_pool_never_puts_two_cells_on_one_gpu_and_runs_each_once():
    slots = gpu_slots("0,2,3", count=4)
    assert [s.name for s in slots] == ["gpu0", "gpu2", "gpu3"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "2", "3"]
    todo = cells(10)
    check_slots(todo, slots)
    busy: dict[str, int] = {}
    log, guard = [], threading.Lock()

    def run_one(cell, slot):
        with guard:
            busy[slot.name] = busy.get(slot.name, 0) + 1
            assert busy[slot.name] == 1, f"two cells on {slot.name}"
            log.append((cell.seed, slot.name, len([v for v in busy.values() if v])))
        time.sleep(0.02 + 0.01 * (cell.seed % 3))
        with guard:
            busy[slot.name] -= 1

    assert run_pool(todo, slots, run_one) == []
    assert sorted(seed for seed, _, _ in log) == list(range(10))
    assert {name for _, name, _ in log} == {"gpu0", "gpu2", "gpu3"}
    assert max(n for _, _, n in log) == 3  # all three GPUs were busy at once


def test_gpu_indices_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slots("all", count=4)] == ["4", "5", "6", "7"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slots("1", count=4)] == ["5"]


@pytest.mark.parametrize("spec,count", [("0,4", 4), ("x", 4), ("0,0", 2), ("all", 0), ("", 2)])
def test_bad_gpu_lists_are_usage_errors(spec, count):
    with pytest.raises(UsageError):
        gpu_slots(spec, count)


def test_pool_refusals():
    with pytest.raises(UsageError, match="device 'cuda'"):
        check_slots(cells(2, device="cuda:1"), gpu_slots("0,1", 2))
    with pytest.raises(UsageError, match="profile cell"):
        check_slots(cells(2, device="cpu", kind="profile"), cpu_slots(2))
    check_slots(cells(2, device="cpu", kind="profile"), cpu_slots(2), share_cpu=True)
    with pytest.raises(UsageError, match="--gpus"):
        check_slots(cells(2, device="cuda"), cpu_slots(2))
    with pytest.raises(UsageError, match="not with --in-process"):
        check_slots(cells(2, device="cpu"), cpu_slots(2), launcher="inprocess")


def test_a_failing_slot_stops_the_pool_taking_cells_and_the_error_reaches_the_caller():
    started = []

    def run_one(cell, slot):
        started.append(cell.seed)
        if cell.seed == 1:
            raise OSError("disk full")
        time.sleep(0.05)

    with pytest.raises(OSError, match="disk full"):
        run_pool(cells(8, device="cpu"), cpu_slots(2), run_one)
    assert len(started) < 8


def test_stop_request_leaves_the_rest_not_started():
    stop = threading.Event()

    def run_one(cell, slot):
        stop.set()

    left = run_pool(cells(5, device="cpu"), [Slot()], run_one, stop.is_set)
    assert len(left) == 4


def test_jobs_runs_cpu_train_cells_side_by_side_and_rows_say_so(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text(tiny_grid("jobs", methods=("bptt_m", "rate_m"), T=(1, 2)))
    r = cli("run", str(grid), "--jobs", "2", "--out", str(tmp_path / "o"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = load_results(tmp_path / "o")
    assert len(rows) == 4 and (rows["status"] == "ok").all() and (rows["concurrent_cells"] == 2).all()
    assert "cpu0: " in r.stderr and "cpu1: " in r.stderr  # the progress line names every running cell's slot
    r = cli("run", "ci_cpu", "--jobs", "2", "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "profile cell(s) would share the CPU" in r.stderr
