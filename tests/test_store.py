"""The result store (reports/results.py): atomic writes, schema versions and upgrades, the lock, file modes."""

import os
import socket
import subprocess
import sys

import pandas as pd
import pytest

from reports import results as store
from reports.results import (SCHEMA_VERSION, FolderBusy, FolderLock, ResultsFileProblem, atomic_write_parquet,
                             load_results, read_table, remove_stray_temp_files, update_manifest, upgrade, write_cell)


def _row(key="k1", status="ok", **kw):
    return {"key": key, "status": status, "method": "bptt_m", "arch": "mlp", "dataset": "digits", "T": 2, "seed": 0,
            "device": "cpu", **kw}


def test_write_and_load(tmp_path):
    write_cell(tmp_path, "k1", _row("k1", x=1.0), [{"epoch": 1, "test_acc": 50.0}], [{"source": "rss", "t_s": 0.0, "mib": 10.0}])
    write_cell(tmp_path, "k2", _row("k2", "error", x=None))
    df = load_results(tmp_path)
    assert sorted(df["key"]) == ["k1", "k2"]
    assert (df["schema_version"] == SCHEMA_VERSION).all()
    assert load_results(tmp_path, "epochs")["test_acc"].tolist() == [50.0]
    assert list(tmp_path.glob("**/*.tmp")) == []


def test_unreadable_file_is_skipped_with_warning_naming_it(tmp_path):
    write_cell(tmp_path, "k1", _row())
    (tmp_path / "cells" / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.warns(UserWarning, match="skipping unreadable results file .*broken.parquet"):
        df = load_results(tmp_path)
    assert df["key"].tolist() == ["k1"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "a.parquet"
    atomic_write_parquet(pd.DataFrame([{"a": 1}]), p)

    class Boom(pd.DataFrame):
        def to_parquet(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_parquet(Boom([{"a": 2}]), p)
    assert pd.read_parquet(p)["a"].tolist() == [1]
    assert [q.name for q in tmp_path.iterdir()] == ["a.parquet"]


def test_schema_1_rows_are_upgraded_and_read_as_stale(tmp_path):
    """A row written before schema versions (no schema_version, no code_fingerprint) is upgraded by the rule, and
    against a folder whose last run recorded a fingerprint it reads as stale."""
    (tmp_path / "cells").mkdir()
    pd.DataFrame([_row("old")]).to_parquet(tmp_path / "cells" / "old.parquet")
    write_cell(tmp_path, "new", _row("new", code_fingerprint="abc"))
    update_manifest(tmp_path, "g", {}, {"cpu": "abc"})
    df = load_results(tmp_path).set_index("key")
    assert df.loc["old", "schema_version"] == SCHEMA_VERSION
    assert bool(df.loc["old", "stale"]) and not bool(df.loc["new", "stale"])


def test_newer_schema_and_missing_columns_name_the_file(tmp_path):
    p = tmp_path / "x.parquet"
    pd.DataFrame([_row(schema_version=SCHEMA_VERSION + 1)]).to_parquet(p)
    with pytest.raises(ResultsFileProblem, match=rf"x.parquet: schema version {SCHEMA_VERSION + 1} is newer"):
        read_table(p)
    pd.DataFrame([{"key": "k", "status": "ok", "method": "m"}]).to_parquet(p)
    with pytest.raises(ResultsFileProblem, match="x.parquet: .*column\\(s\\) arch, dataset, T missing"):
        read_table(p)


def test_no_upgrade_rule_is_named(monkeypatch):
    monkeypatch.setattr(store, "SCHEMA_VERSION", 3)
    with pytest.raises(ResultsFileProblem, match="no upgrade from schema version 2 to 3"):
        upgrade(pd.DataFrame([_row(schema_version=2)]), "f.parquet")


def test_wrong_types_and_nan_identity_are_read_not_raised(tmp_path):
    """A string where a number belongs becomes null (with a warning naming the file and column); a row whose T
    is NaN is dropped with a warning; the rest reads with T as integers."""
    (tmp_path / "cells").mkdir()
    pd.DataFrame([_row("a", step_time_ms_median="fast"), _row("b", step_time_ms_median="3.5")]).to_parquet(
        tmp_path / "cells" / "mixed.parquet")
    pd.DataFrame([_row("c", T=float("nan")), _row("d", T=4.0)]).to_parquet(tmp_path / "cells" / "nan.parquet")
    with pytest.warns(UserWarning) as rec:
        df = load_results(tmp_path).set_index("key")
    msgs = " | ".join(str(w.message) for w in rec)
    assert "mixed.parquet: column 'step_time_ms_median'" in msgs and "'fast'" in msgs
    assert "nan.parquet: column 'T' holds null where a whole number belongs: 1 cell row(s) skipped" in msgs
    assert sorted(df.index) == ["a", "b", "d"]
    assert pd.isna(df.loc["a", "step_time_ms_median"]) and df.loc["b", "step_time_ms_median"] == 3.5
    assert df["T"].dtype == "int64" and df.loc["d", "T"] == 4


def test_stray_temp_files_are_removed(tmp_path):
    write_cell(tmp_path, "k1", _row())
    stray = tmp_path / "cells" / ".k2.parquet.abc123.tmp"
    stray.write_bytes(b"half a file")
    assert remove_stray_temp_files(tmp_path) == [stray]
    assert not stray.exists() and (tmp_path / "cells" / "k1.parquet").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_result_files_follow_the_umask(tmp_path, umask):
    """What a fresh process with this umask writes has mode 0666 & ~umask (mkstemp alone gives 0600)."""
    code = (f"import os; os.umask({umask}); from reports.results import write_cell; "
            f"write_cell({str(tmp_path)!r}, 'k', {_row()!r}, [{{'epoch': 1}}])")
    subprocess.run([sys.executable, "-c", code], check=True)
    for p in [tmp_path / "cells" / "k.parquet", tmp_path / "epochs" / "k.parquet"]:
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask


def test_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    with FolderLock(tmp_path):
        with pytest.raises(FolderBusy, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
            FolderLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}}}')
    lock = FolderLock(tmp_path).acquire()
    assert lock.taken_over["pid"] == dead.pid
    lock.release()
    (tmp_path / ".lock").write_text('{"host": "another-host.example", "pid": 1}')
    with pytest.raises(FolderBusy, match="another-host.example"):
        FolderLock(tmp_path).acquire()


def test_store_module_is_torch_free():
    code = ("import sys; import reports.results, reports; "
            "bad = [m for m in ('torch', 'bench', 'methods') if m in sys.modules]; print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_reading_some_columns_gives_what_reading_all_gives_for_them(tmp_path):
    """load_results(columns=...) reads those columns of every file (a file without one of them: null there, as in
    a full read), the ones a row needs, and the stale mark; the values are the full read's."""
    from reports.results import load_results, write_cell

    base = {"status": "ok", "method": "bptt_m", "arch": "mlp", "dataset": "digits", "kind": "train", "seed": 0,
            "method_options": "{}", "code_fingerprint": "f"}
    write_cell(tmp_path, "a", {**base, "key": "a", "T": 1, "epochs": 3, "acc_top1": 90.0})
    write_cell(tmp_path, "b", {**base, "key": "b", "T": 2, "acc_top1": 80.0})  # written without "epochs"
    full = load_results(tmp_path).set_index("key")
    some = load_results(tmp_path, columns=["epochs", "kind"]).set_index("key")
    assert "acc_top1" not in some and {"epochs", "kind", "status", "T", "stale"} <= set(some.columns)
    for col in ("epochs", "kind", "status", "T", "stale"):
        assert some[col].equals(full.loc[some.index, col]), col
    assert some.loc["a", "epochs"] == 3 and pd.isna(some.loc["b", "epochs"])
