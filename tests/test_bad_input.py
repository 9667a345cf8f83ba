"""Bad input through the real command line: exit 2, one message, no traceback, stored results untouched."""

import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.results import write_cell

from .helpers import REPO, cli, cpu_baseline_rows, tiny_grid, write_rows

TINY = tiny_grid()


@pytest.fixture
def stored(tmp_path):
    """A results folder that already holds a cell: bad input must leave it as it is."""
    out = tmp_path / "res"
    write_cell(out, "k0", {"key": "k0", "status": "ok", "method": "bptt_m", "arch": "mlp", "dataset": "digits", "T": 1})
    return out


def _snapshot(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}


def _assert_one_message(r, msg):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert msg in lines[0], r.stderr


def _grid(tmp_path, text, name="g.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("extra,msg", [
    ("exclude = 5\n", "'exclude' must be a list of tables"),
    ("[[override]]\nset = 5\n", "each [[override]] needs a 'set' table"),
    ("[[override]]\nmatch = 3\nset = { lr = 0.1 }\n", "each [[override]] needs a 'set' table"),
    ("name = 7\n", "'name' must be a string"),
])
def test_grid_structure_of_the_wrong_type(tmp_path, stored, extra, msg):
    text = TINY.replace('name = "tiny"\n', "") if extra.startswith("name") else TINY
    before = _snapshot(stored)
    p = _grid(tmp_path, extra + text if not extra.startswith("[[") else text + extra)
    _assert_one_message(cli("run", str(p), "--out", str(stored)), msg)
    assert _snapshot(stored) == before


def test_fixed_that_is_not_a_table(tmp_path, stored):
    p = _grid(tmp_path, 'fixed = 5\n[axes]\nmethod = ["bptt_m"]\narch = ["mlp"]\ndataset = ["digits"]\nT = [1]\n')
    _assert_one_message(cli("run", str(p), "--out", str(stored)), "'fixed' must be a table")


def test_grid_path_that_is_a_directory(tmp_path, stored):
    d = tmp_path / "adir"
    d.mkdir()
    _assert_one_message(cli("run", str(d), "--out", str(stored)), "is a directory, not a grid file")


@pytest.mark.parametrize("setting,msg", [
    ("lr=0", "lr must be a finite number > 0, got 0.0"),
    ("lr=-0.1", "lr must be a finite number > 0"),
    ("lr=nan", "lr must be a finite number > 0, got nan"),
    ("lr=inf", "lr must be a finite number > 0, got inf"),
    ("momentum=1", "momentum must be in [0, 1), got 1.0"),
    ("momentum=-0.5", "momentum must be in [0, 1)"),
    ("seed=-1", "seed must be >= 0"),
    ("T=5000", "T must be a positive integer up to 4096, got 5000"),
    ("batch_size=0", "batch_size must be > 0"),
    ("weight_decay=-1", "weight_decay must be a finite number >= 0"),
    ('arch_options={"widths": [16], "depth": 3}', "arch mlp has no option(s) 'depth'; valid: bn, in_features, input_hw"),
])
def test_numeric_ranges_are_checked_before_any_cell_runs(tmp_path, stored, setting, msg):
    before = _snapshot(stored)
    r = cli("run", str(_grid(tmp_path, TINY)), "--out", str(stored), "--set", setting)
    _assert_one_message(r, msg)
    assert _snapshot(stored) == before


def test_out_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    g = _grid(tmp_path, TINY)
    _assert_one_message(cli("run", str(g), "--out", str(f)), "is a file, not a folder")
    _assert_one_message(cli("run", str(g), "--out", str(f / "sub")), "lies under a file")
    assert f.read_text() == "x"


def test_out_too_long(tmp_path):
    _assert_one_message(cli("run", str(_grid(tmp_path, TINY)), "--out", str(tmp_path / ("x" * 300))),
                        "File name too long")


def test_out_unwritable(tmp_path):
    """A read-only folder: a read-only tmpfs where this user may mount one (root ignores file modes), else a
    folder without write permission."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root without mount: a permission bit cannot make a folder unwritable")
        ro.chmod(0o555)
    try:
        r = cli("run", str(_grid(tmp_path, TINY)), "--out", str(ro / "res"))
        _assert_one_message(r, "cannot be used as a results folder")
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])
        else:
            ro.chmod(0o755)


def test_check_report_and_baseline_to_a_folder(tmp_path, stored):
    from reports.results import atomic_write_parquet

    base = tmp_path / "b.parquet"
    atomic_write_parquet(pd.read_parquet(stored / "cells" / "k0.parquet"), base)
    d = tmp_path / "adir"
    d.mkdir()
    _assert_one_message(cli("check", "--baseline", str(base), "--results", str(stored), "--report", str(d)),
                        "--report")
    _assert_one_message(cli("baseline", str(stored), str(d)), "is a folder; give the parquet file to write")
    assert list(d.iterdir()) == []


def test_tolerance_naming_no_metric(tmp_path, stored):
    _assert_one_message(cli("check", "--baseline", str(stored), "--results", str(stored), "--tolerance",
                            "step_tme_ms_median=5"), "no metric 'step_tme_ms_median'; valid: acc_shuffled, acc_top1")


def test_grid_device_is_honoured(tmp_path, stored):
    """The grid's own device is used when the command line names none: cuda on a machine without one is bad input
    (the CLI default used to override it with cpu); --device cpu overrides the grid."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this test needs a machine without CUDA")
    g = _grid(tmp_path, TINY.replace("[fixed]\n", '[fixed]\ndevice = "cuda"\n'))
    _assert_one_message(cli("run", str(g), "--out", str(stored)), "no CUDA device is available here")
    out = tmp_path / "cpu"
    r = cli("run", str(g), "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert pd.read_parquet(next((out / "cells").glob("*.parquet")))["device"].tolist() == ["cpu"]


@pytest.mark.parametrize("name", ["..", "../../x", "a/b", "."])
def test_grid_name_must_be_a_file_name(tmp_path, name):
    g = _grid(tmp_path, TINY.replace('name = "tiny"', f"name = {name!r}".replace("'", '"')), name="safe.toml")
    before = sorted(p.name for p in REPO.iterdir())
    r = cli("run", str(g))
    _assert_one_message(r, "must be a plain file name")
    assert sorted(p.name for p in REPO.iterdir()) == before  # nothing written into the repository root


def _cifar_dir(root: Path, batch: bytes) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    ok = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    for name in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        (d / name).write_bytes(pickle.dumps(ok))
    (d / "data_batch_1").write_bytes(batch)
    return root


def test_crafted_cifar_pickle_runs_no_code(tmp_path):
    """A data_batch_1 whose unpickling would call os.system: refused by the restricted unpickler, the command never
    runs, and the cell fails with a message naming the file and the refused global."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    root = _cifar_dir(tmp_path / "data", pickle.dumps({b"data": Evil(), b"labels": [0]}))
    g = _grid(tmp_path, tiny_grid(dataset="cifar10", train_subset=4))
    r = cli("run", str(g), "--out", str(tmp_path / "res"), "--data-root", str(root), "--device", "cpu")
    assert not marker.exists()
    assert r.returncode == 1, r.stderr
    assert "data_batch_1: refused to load" in r.stderr and ("posix.system" in r.stderr or "os.system" in r.stderr), r.stderr


# --------------------------------------------------------------------------- a configuration column null or mistyped

# per stored type, a null and a value of the wrong type (reports.results.CONFIG_TYPES)
_BAD_VALUES = {"text": [None, 7], "int": [None, 2.5], "float": [None, "abc"], "object": [None, "[1, 2]"],
               "list": [None, '{"a": 1}']}


def test_a_null_weight_decay_is_one_warning_not_a_traceback(tmp_path):
    """The probe: one stored cell's weight_decay is NaN; check names the file and the column, skips that cell
    (which the baseline then misses: a regression), and leaves the results as they were."""
    rows = cpu_baseline_rows()
    out = write_rows(tmp_path / "res", [{**rows[0], "weight_decay": float("nan")}] + rows[1:])
    bad = out / "cells" / f"{rows[0]['key']}.parquet"
    before = _snapshot(out)
    r = cli("check", "--baseline", str(REPO / "baselines" / "cpu.parquet"), "--results", str(out))
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"warning: {bad}: column 'weight_decay' holds null where a number belongs: 1 cell row(s) skipped" \
        in r.stderr, r.stderr
    assert r.returncode == 1 and "19 matched cells" in r.stdout and "REGRESSION (not in results)" in r.stdout
    assert _snapshot(out) == before


def test_every_configuration_column_null_or_mistyped_through_every_reading_command(tmp_path):
    """For every configuration column of the Cell, a stored cell with it null and one with a value of the wrong
    type, beside the 20 good cells of the CPU baseline: check, report, status, history and baseline each end
    without a traceback, warn once per bad file naming it and the column, use the good cells, and change no
    stored file."""
    from reports.results import CONFIG_TYPES

    rows = cpu_baseline_rows()
    bad = {f"bad-{col}-{j}": (col, value) for col, kind in CONFIG_TYPES.items()
           for j, value in enumerate(_BAD_VALUES[kind])}  # key -> (column, its bad value)
    out = write_rows(tmp_path / "res", rows + [{**rows[0], "key": k, col: v} for k, (col, v) in bad.items()])
    before = _snapshot(out)
    base = REPO / "baselines" / "cpu.parquet"
    runs = {
        "check": cli("check", "--baseline", str(base), "--results", str(out), "--invariants", str(out)),
        "report": cli("report", str(out)),
        "status": cli("status", str(out)),
        "history": cli("history", str(tmp_path / "hist"), "--add", str(out), "--commit", "abc1234"),
        "baseline": cli("baseline", str(out), str(tmp_path / "b.parquet")),
    }
    for name, r in runs.items():
        assert "Traceback" not in r.stderr + r.stdout, f"{name}:\n{r.stderr[-3000:]}"
        assert r.returncode == 0, f"{name}: rc {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
        for key, (col, _) in bad.items():
            assert f"{key}.parquet: column '{col}'" in r.stderr, f"{name}: no warning for {key}\n{r.stderr[-1500:]}"
    assert "20 matched cells" in runs["check"].stdout and "gate passed" in runs["check"].stdout
    assert runs["status"].stdout.startswith("20 cell(s): ")
    assert len(pd.read_parquet(tmp_path / "b.parquet")) == 20
    after = {k: v for k, v in _snapshot(out).items() if not k.startswith("report/")}  # the report is new
    assert after == before  # nothing stored was touched
