"""The command line: bad input ends with one message and exit code 2; a killed grid resumes."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import run_bench
from reports.results import load_results
from methods import METHODS, Method

from .helpers import cli, tiny_grid, wait_for

REPO = Path(__file__).resolve().parents[1]

TINY = tiny_grid(methods=("bptt_m", "rate_m"), T=(1, 2), train_subset=256)


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


@pytest.mark.parametrize("args,msg", [
    (["run", "default", "--filter", "method=sgd"], "unknown method 'sgd'; valid: bptt_m, bptt_s, hm2bp, os, ottt_a, ottt_o, rate_m, rate_s, sltt, sltt_k"),
    (["run", "default", "--filter", "method=hm2bp", "--set", "arch=resnet18"],
     "method hm2bp does not support arch 'resnet18'; it supports: hm2_cnn, hm2_mlp"),
    (["run", "default", "--filter", "method=bptt_m", "--set", "arch=hm2_mlp"],
     "method bptt_m does not support arch 'hm2_mlp'; it supports: cnn_digits, mlp, preact_resnet34"),
    (["run", "default", "--filter", "arch=resnet7"], "unknown arch 'resnet7'; valid:"),
    (["run", "default", "--set", "dataset=cifar11"], "unknown dataset 'cifar11'; valid: cifar10, cifar100, cifar10_dvs, digits, imagenet, mnist, nmnist"),
    (["run", "default", "--filter", "T=0"], "T must be a positive integer"),
    (["run", "default", "--set", "T=-2"], "T must be a positive integer"),
    (["run", "no_such_grid"], "not found; grids here:"),
    (["run", "default", "--data-root", "/no/such/folder"], "data folder '/no/such/folder' does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_message(args, msg):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


def test_malformed_grid_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[axes]\nmethod = [\"bptt_m\"\n")
    r = cli("run", str(p))
    assert r.returncode == 2 and "is not valid TOML" in r.stderr and "Traceback" not in r.stderr


def test_unsupported_arch_exits_2(monkeypatch, tiny, capsys):
    class OnlyMLP(Method):
        name = "only_mlp"

        def supports(self, arch):
            return arch == "mlp"

    monkeypatch.setitem(METHODS, "only_mlp", OnlyMLP)
    rc = run_bench.main(["run", str(tiny), "--set", "method=only_mlp", "--set", "arch=cnn_digits", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "method only_mlp does not support arch 'cnn_digits'; it supports: mlp" in err


def test_list():
    r = cli("list")
    assert r.returncode == 0
    for word in ("bptt_m", "rate_s", "resnet18", "sew_resnet34", "digits", "synthetic:cifar10", "default", "profile_cpu"):
        assert word in r.stdout


KILL_RATE_M_T2 = """
import importlib.util, os, signal, sys


class _KillOne:
    def find_spec(self, name, path=None, target=None):
        if name != "bench.runner":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            run = module.run_cell

            def run_cell(cell, *args, **kwargs):
                if cell.method == "rate_m" and cell.T == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return run(cell, *args, **kwargs)

            module.run_cell = run_cell

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _KillOne())
"""


def test_worker_crash_becomes_a_row_and_grid_goes_on(tiny, tmp_path):
    """A worker killed hard (here by a sitecustomize whose import hook makes bench.runner.run_cell SIGKILL its
    process for the rate_m T=2 cell: in a fork server's child as in a worker started afresh) leaves a stored row."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_RATE_M_T2)
    out = tmp_path / "res"
    r = cli("run", str(tiny), "--out", str(out), "--device", "cpu", env={"PYTHONPATH": str(hook)})
    assert r.returncode == 1, r.stderr
    assert "1 cell(s) failed" in r.stderr and "[oom] rate_m mlp digits T=2" in r.stderr
    df = load_results(out)
    assert len(df) == 4
    assert sorted(df["status"]) == ["ok", "ok", "ok", "oom"]
    bad = df[df.status == "oom"].iloc[0]
    assert "SIGKILL" in bad["error"] and bad["method"] == "rate_m" and bad["T"] == 2


def test_sigkill_then_rerun_completes_only_missing_cells(tiny, tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, str(REPO / "run_bench.py"), "run", str(tiny), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = out / "cells"
    wait_for(lambda: cells.is_dir() and len(list(cells.glob("*.parquet"))) >= 2, timeout=240, what="two stored cells",
             poll_s=0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the running worker dies with its parent (PR_SET_PDEATHSIG)
    first = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.parquet")}
    assert 2 <= len(first) < 4, first
    for p in out.rglob("*.parquet"):  # every stored file is whole
        pd.read_parquet(p)
    assert not list(out.rglob("*.tmp"))
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(first)} cell(s) already stored with status ok: skipped" in r.stderr
    after = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.parquet")}
    assert len(after) == 4
    assert all(after[k] == v for k, v in first.items())  # stored cells were not run again
