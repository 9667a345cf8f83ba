"""The loader benchmark's miniature CIFAR10-DVS is read back whole by the real loader, and its report runs."""

import event_loader


def test_miniature_is_read_back_and_the_benchmark_runs(tmp_path, capsys):
    from bench.data import open_dataset

    event_loader.write_miniature(tmp_path, per_class=2, events=500)
    train = open_dataset("cifar10_dvs", tmp_path, True, 4)
    x, y = train[0]
    assert len(train) == 18 and x.shape == (4, 2, 48, 48) and 0 <= y < 10
    assert float(x.sum()) > 0
    assert event_loader.main(["--per-class", "2", "--events", "500", "--T", "4"]) == 0
    out = capsys.readouterr().out
    assert "18 training recordings" in out and "18 frame files cached" in out
