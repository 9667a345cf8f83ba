"""The gate's calibration runs end to end on a two-cell grid: an A/A comparison and a 4x slowdown of bptt_m, each
with the gate's confirming second measurement; the slowdown is found and confirmed, and the report says so."""

import calibrate_compare
import pandas as pd
import torch

GRID = """name = "tiny"
[axes]
method = ["bptt_m"]
arch = ["cnn_digits"]
dataset = ["synthetic:cifar10"]
T = [1, 2]
[fixed]
kind = "profile"
batch_size = 8
warmup_steps = 1
steps = 10  # five ABBA quartets a round: one quartet disturbed by a busy machine cannot hide a 4x slowdown
"""


def test_calibration_finds_and_confirms_a_large_slowdown(tmp_path):
    (tmp_path / "tiny.toml").write_text(GRID)
    rc = calibrate_compare.main(["--grid", str(tmp_path / "tiny.toml"), "--trials", "1", "--rounds", "1",
                                 "--slowdowns", "300", "--thresholds", "5", "--out", str(tmp_path / "out")])
    assert rc == 0
    v = pd.read_parquet(tmp_path / "out" / "verdicts.parquet")
    assert (v["device"] == "cpu").all()  # the device it ran on, the one `run` picks here (no GPU)
    slowed = v[v["head"] == "S300"]
    assert (slowed["verdict"] == "slower").all() and len(slowed) == 3  # two cells and the method over them
    steps = pd.read_parquet(tmp_path / "out" / "steps.parquet")
    assert set(steps[steps["comparison"] == "S300"]["stage"]) == {"first", "again"}
    assert "1/1 (1/1)" in (tmp_path / "out" / "calibration.md").read_text()
    assert "device cpu:" in (tmp_path / "out" / "calibration.md").read_text()
    # a second run adds its trial to the first (a calibration run in parts), from the verdicts alone (what the
    # project keeps of a calibration); other settings are refused
    (tmp_path / "out" / "steps.parquet").unlink()
    rc = calibrate_compare.main(["--grid", str(tmp_path / "tiny.toml"), "--trials", "1", "--rounds", "1",
                                 "--slowdowns", "300", "--thresholds", "5", "--out", str(tmp_path / "out"), "--resume"])
    assert rc == 0
    v = pd.read_parquet(tmp_path / "out" / "verdicts.parquet")
    assert sorted(v["trial"].unique()) == [0, 1] and v["rev"].str.startswith("working tree").all()
    assert set(pd.read_parquet(tmp_path / "out" / "steps.parquet")["trial"]) == {1}
    text = (tmp_path / "out" / "calibration.md").read_text()
    assert "2 trial(s)" in text and "2/2 (2/2)" in text
    assert calibrate_compare.main(["--grid", str(tmp_path / "tiny.toml"), "--trials", "1", "--rounds", "2",
                                   "--slowdowns", "300", "--thresholds", "5", "--out", str(tmp_path / "out"),
                                   "--resume"]) == 2


def test_calibration_refuses_bad_input_before_any_trial(tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(GRID)
    args = ["--grid", str(tmp_path / "tiny.toml"), "--trials", "1", "--out", str(tmp_path / "out")]
    assert calibrate_compare.main(args + ["--method", "rate_m"]) == 2
    assert "has no profile cell of method rate_m" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the device goes to the cells as `run --device` sends it
        assert calibrate_compare.main(args + ["--device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "out" / "verdicts.parquet").exists()


def test_injected_slowdown_is_a_share_of_the_gpu_work(tmp_path, monkeypatch):
    """On a GPU a step returns while its kernels still run: the injected spin must wait for them and be a share of
    the step's whole duration, or it hides behind the work the timing probe waits for anyway. Here the GPU's
    backlog is a stand-in synchronize that takes 50 ms, the step itself returns at once, and the slowdown is 100%:
    the wrapped step takes the backlog and as much again."""
    import time

    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "__init__.py").write_text(
        "class Quick:\n    def train_step(self, *args):\n        return 'out'\n\n\nMETHODS = {'quick': Quick}\n")
    calibrate_compare.inject_slowdown(tmp_path, "quick", 100)
    backlog = 0.05
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: time.sleep(backlog))
    ns: dict = {}
    exec(compile((tmp_path / "methods" / "__init__.py").read_text(), "methods/__init__.py", "exec"), ns)
    t0 = time.perf_counter()
    assert ns["Quick"]().train_step("model", "x") == "out"
    assert 2 * backlog <= time.perf_counter() - t0 < 2 * backlog + 0.5
