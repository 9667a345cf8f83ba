import pandas as pd
import pytest

from bench.store import atomic_write_parquet, load_results, stored_ok_keys, write_cell


def test_write_and_load(tmp_path):
    write_cell(tmp_path, "k1", {"key": "k1", "status": "ok", "x": 1.0}, [{"epoch": 1, "test_acc": 50.0}], [{"source": "rss", "t_s": 0.0, "mib": 10.0}])
    write_cell(tmp_path, "k2", {"key": "k2", "status": "error", "x": None})
    df = load_results(tmp_path)
    assert sorted(df["key"]) == ["k1", "k2"]
    assert stored_ok_keys(tmp_path) == {"k1"}
    assert load_results(tmp_path, "epochs")["test_acc"].tolist() == [50.0]
    assert list(tmp_path.glob("**/*.tmp")) == []


def test_unreadable_file_is_skipped_with_warning(tmp_path):
    write_cell(tmp_path, "k1", {"key": "k1", "status": "ok"})
    (tmp_path / "cells" / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.warns(UserWarning, match="skipping unreadable results file"):
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
