"""scripts/gpu-check.sh, the one command for every GPU fact, runs its whole plumbing on this CPU at toy sizes
(--device cpu --quick): every part passes, and it leaves at most 8 files (what a device machine's call brings
back), a summary of every part and one tarball of the results."""

import subprocess
import tarfile

import pytest

from .helpers import REPO

SCRIPT = REPO / "scripts" / "gpu-check.sh"
PARTS = ("gpu-tests", "gate", "train", "resume", "aa", "paper_cost", "backends")


@pytest.mark.slow
def test_every_part_runs_on_a_cpu_and_leaves_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPT), str(out), "--device", "cpu", "--quick"], capture_output=True, text=True,
                       cwd=REPO, timeout=900)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    assert r.returncode == 0, r.stderr[-3000:] + summary
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["results.tgz", "summary.md"] and len(files) <= 8
    for part in PARTS:
        assert f"| {part} | ok |" in summary and f"## {part}: ok" in summary, part
    assert "rate_m step-time growth in T vs bptt_m" in summary and "gate passed" in summary
    assert "largest relative difference 0.00e+00" in summary  # the resumed cell equals the uninterrupted one
    from methods import METHODS

    n = len(METHODS)
    assert f"{n} cell(s): {n} ok" in summary  # every method trained, each on triton and in bf16 where it can
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    for part in PARTS:
        assert f"gpu-check/{part}.log" in names
    assert any(n.startswith("gpu-check/train/cells/") for n in names)


@pytest.mark.parametrize("args,msg", [(["--parts", "gate,nosuch"], "unknown part(s) nosuch"),
                                      (["--device", "tpu"], "--device must be cpu, cuda or cuda:N")])
def test_bad_input_is_one_message_and_exit_2(tmp_path, args, msg):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "o"), *args], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
