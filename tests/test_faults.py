"""Faults through the real command line: a full disk, a host out-of-memory, two runs into one folder, a killed
writer's temporary files, a gate whose results lack a baseline cell, the file modes of what is stored."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from reports.results import load_results

from .helpers import REPO, tiny_grid

def _grid(tmp_path, T=(1,), extra="") -> Path:
    p = tmp_path / f"faults{len(T)}.toml"
    p.write_text(tiny_grid("faults", T=T, extra=extra))
    return p


def _run(*args, limit=None, umask=None, timeout=300):
    def pre():
        if limit is not None:
            resource.setrlimit(*limit)
        if umask is not None:
            os.umask(umask)

    return subprocess.run([sys.executable, str(REPO / "run_bench.py"), "run", *map(str, args), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, preexec_fn=pre)


def _all_readable(out: Path) -> int:
    files = list(out.rglob("*.parquet"))
    for p in files:
        pd.read_parquet(p)
    assert not list(out.rglob("*.tmp"))
    return len(files)


def _assert_store_failure(r, cause: str, left: int):
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    err = r.stderr[r.stderr.index("error:"):]
    assert cause in err and f"{left} cell(s) not stored" in err, r.stderr


def test_a_file_size_limit_while_storing_stops_the_grid_cleanly(tmp_path):
    """Any error while storing a row (here EFBIG from RLIMIT_FSIZE, which lets the small manifest through and
    stops the cell file) ends the grid with one message naming the cause and the cells left; the cell stored
    before stays readable; the same command without the limit finishes the grid."""
    out = tmp_path / "res"
    r = _run(_grid(tmp_path, (1,)), "--out", out)
    assert r.returncode == 0, r.stderr
    first = {p.name: p.read_bytes() for p in (out / "cells").glob("*.parquet")}
    r = _run(_grid(tmp_path, (1, 2, 3)), "--out", out, limit=(resource.RLIMIT_FSIZE, (6000, 6000)))
    _assert_store_failure(r, "File too large", 2)
    assert "the 1 cell(s) stored before stay readable" in r.stderr
    assert {p.name: p.read_bytes() for p in (out / "cells").glob("*.parquet")} == first
    _all_readable(out)
    r = _run(_grid(tmp_path, (1, 2, 3)), "--out", out)
    assert r.returncode == 0, r.stderr
    assert "1 cell(s) already stored with status ok: skipped" in r.stderr
    assert sorted(load_results(out)["T"]) == [1, 2, 3]


def test_a_full_disk_stops_the_grid_cleanly(tmp_path):
    """A real full disk: a small tmpfs, filled up after the first cell."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        out = disk / "res"
        r = _run(_grid(tmp_path, (1,)), "--out", out)
        assert r.returncode == 0, r.stderr
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # take every free byte but a few KiB
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        os.truncate(filler, max(0, filler.stat().st_size - 3 * 4096))
        r = _run(_grid(tmp_path, (1, 2, 3)), "--out", out)
        assert r.returncode == 1, r.stderr
        assert "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert _all_readable(out) >= 1
        filler.unlink()
        r = _run(_grid(tmp_path, (1, 2, 3)), "--out", out)
        assert r.returncode == 0, r.stderr
        assert sorted(load_results(out)["T"]) == [1, 2, 3]
    finally:
        subprocess.run(["umount", str(disk)])


def test_host_out_of_memory_is_stored_as_oom(tmp_path):
    """A cell that asks for more host memory than the process may have (RLIMIT_AS) fails with torch's "can't
    allocate memory"; its row says oom, not error."""
    g = tmp_path / "big.toml"
    g.write_text('name = "big"\n[axes]\nmethod = ["bptt_m"]\narch = ["mlp"]\ndataset = ["synthetic:digits"]\nT = [4]\n'
                 '[fixed]\nkind = "profile"\nbatch_size = 4096\nsteps = 1\nwarmup_steps = 0\n'
                 'arch_options = { widths = [65536] }\n')
    r = _run(g, "--out", tmp_path / "res", limit=(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30)))
    assert r.returncode == 1, r.stderr
    row = load_results(tmp_path / "res").iloc[0]
    assert row["status"] == "oom", row["error"]
    assert "can't allocate memory" in row["error"]


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "res"
    # enough work that the first run outlives the checks below (workers start in ~0.03 s: the work is the cells')
    g = _grid(tmp_path, (1, 2, 3, 4, 5, 6), extra='[[override]]\nmatch = { method = "bptt_m" }\nset = { epochs = 300 }\n')
    first = subprocess.Popen([sys.executable, str(REPO / "run_bench.py"), "run", str(g), "--out", str(out), "--device", "cpu"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / ".lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        r = _run(g, "--out", out)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"pid {first.pid}" in r.stderr and "is being written by another run" in r.stderr
        while '"cell": "bptt_m' not in (out / ".lock").read_text() and time.time() < deadline:
            time.sleep(0.05)
        # status is a snapshot: between a worker storing its cell and the launcher naming the next one, the lock
        # names a finished cell and nothing reads as running; ask again until a snapshot falls inside a cell
        for _ in range(3):
            st = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "status", str(out)], capture_output=True,
                                text=True, cwd=REPO)
            assert st.returncode == 0, st.stderr
            if ", 1 running" in st.stdout.splitlines()[0]:
                break
        assert ", 1 running" in st.stdout.splitlines()[0], st.stdout
        assert first.poll() is None, "the first run ended before it could be killed: give it more cells"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    time.sleep(0.5)  # its worker dies with it
    # the dead run's lock is taken over, and what it left half-written is cleaned up
    stray = out / "cells" / ".deadbeef.parquet.x1.tmp"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half")
    r = _run(g, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"took over the lock of a run that is no longer alive (pid {first.pid})" in r.stderr
    assert not stray.exists() and not (out / ".lock").exists()
    assert sorted(load_results(out)["T"]) == [1, 2, 3, 4, 5, 6]


def test_stored_files_follow_the_umask(tmp_path):
    out = tmp_path / "res"
    r = _run(_grid(tmp_path), "--out", out, umask=0o002)
    assert r.returncode == 0, r.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    for p in files:
        if p.suffix in (".parquet", ".json"):
            assert p.stat().st_mode & 0o777 == 0o664, p


def _cells(tmp_path, name, rows):
    from reports.results import write_cell

    out = tmp_path / name
    for i, r in enumerate(rows):
        write_cell(out, f"k{i}", {"key": f"k{i}", "status": "ok", "arch": "mlp", "dataset": "digits", "seed": 0,
                                  "kind": "profile", "device": "cpu", "saved_for_backward_mib": 1.0, **r})
    return out


def test_gate_fails_when_a_baseline_cell_is_missing_or_unreadable(tmp_path):
    from .helpers import cli

    base = _cells(tmp_path, "base", [{"method": "bptt_m", "T": 1}, {"method": "rate_m", "T": 1}])
    res = _cells(tmp_path, "res", [{"method": "bptt_m", "T": 1}])
    r = cli("check", "--baseline", str(base), "--results", str(res))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "REGRESSION (not in results)" in r.stdout and "gate FAILED" in r.stdout
    res2 = _cells(tmp_path, "res2", [{"method": "bptt_m", "T": 1}, {"method": "rate_m", "T": 1}])
    (res2 / "cells" / "k1.parquet").write_bytes(b"PAR1 damaged")
    r = cli("check", "--baseline", str(base), "--results", str(res2))
    assert r.returncode == 1 and "gate FAILED" in r.stdout, r.stdout + r.stderr
    assert "skipping unreadable results file" in r.stderr and "k1.parquet" in r.stderr
    assert "Traceback" not in r.stderr
