"""The GitHub workflow is read by GitHub: it is checked against GitHub's workflow schema by check-jsonschema, and
the commands its steps run exist in our command line."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import tiny_profile_grid

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / ".github" / "workflows").glob("*.yml"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_matches_githubs_schema(path):
    exe = shutil.which("check-jsonschema")
    assert exe, "check-jsonschema is a test dependency (pip install -e '.[test]')"
    r = subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_workflow_commands_parse():
    """Every `run_bench.py <command> ...` line of the workflow names a command and options the parser knows."""
    import re
    import shlex

    from run_bench import build_parser

    text = WORKFLOWS[0].read_text().replace("\\\n", " ")
    calls = re.findall(r"python run_bench\.py ([^\n]+)", text)
    assert {c.split()[0] for c in calls} >= {"compare", "run", "check", "history", "report"}
    for c in calls:
        argv = [re.sub(r"\$\{\{[^}]*\}\}|\$[A-Z_]+", "X", a) for a in shlex.split(c.split("&&")[0])]
        ns = build_parser().parse_args(argv)  # exits (SystemExit) on an unknown command or option
        # a default the workflow spells out must be the one the code keeps (it is better left out)
        for option, value in _DEFAULTS.items():
            if hasattr(ns, option):
                assert getattr(ns, option) == value, f"the workflow's --{option.replace('_', '-')} is not the default"


def _defaults() -> dict:
    from bench.check import FLAT_TOL_PCT, MAX_GROWTH_RATIO
    from bench.compare import DEFAULT_THRESHOLD_PCT
    from bench.slurm import POLL_S

    return {"max_growth_ratio": MAX_GROWTH_RATIO, "flat_tol": FLAT_TOL_PCT, "threshold": DEFAULT_THRESHOLD_PCT,
            "poll_s": POLL_S}


_DEFAULTS = _defaults()


# six measured steps: three ABBA quartets a round, the fewest the compare step judges
TINY = tiny_profile_grid("tiny_gpu_gate", batch_size=4, steps=6, width=4)


def _gate_steps() -> list[dict]:
    """The steps of the GPU workflow's one job, as GitHub reads them."""
    import yaml

    return yaml.safe_load(WORKFLOWS[0].read_text())["jobs"]["gate"]["steps"]


def _run_workflow(event: str, repo: Path, tmp: Path, sha: str) -> dict:
    """The workflow's `run:` steps for one event, as the runner runs them (bash -e, in the checkout, with the
    job's environment), on this CPU: its grid replaced by a two-cell one and `--device cuda` by cpu. The Install
    step is this test's environment; `uses:` steps are GitHub's. Returns the steps' outputs."""
    import os
    import re

    (tmp / "tiny.toml").write_text(TINY)
    values = {"github.event.pull_request.base.sha": sha, "github.event.pull_request.head.sha": sha}
    outputs: dict = {}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GITHUB_SHA": sha, "SNNBENCH_HISTORY": str(tmp / "runner-history"), "GITHUB_OUTPUT": str(tmp / "out.txt")}
    ran = []
    for step in _gate_steps():
        if "run" not in step or "pip install" in step["run"]:
            continue
        cond = step.get("if", "true")
        m = re.fullmatch(r"github\.event_name == '(\w+)'", cond)
        assert m or cond == "true", f"a condition this test does not know: {cond}"
        if m and m.group(1) != event:
            continue
        script = step["run"].replace(". .venv-gpu/bin/activate", ":")
        script, n = re.subn(r"\bci_gpu --device cuda\b", f"{tmp / 'tiny.toml'} --device cpu", script)
        script = re.sub(r"\$\{\{ steps\.(\w+)\.outputs\.(\w+) \}\}", lambda g: outputs[g.group(1)][g.group(2)], script)
        script = re.sub(r"\$\{\{ ([\w.]+) \}\}", lambda g: values[g.group(1)], script)
        assert "${{" not in script, script
        (tmp / "out.txt").write_text("")
        r = subprocess.run(["bash", "-e", "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"step {step['name']!r} failed:\n{script}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        if "id" in step:
            outputs[step["id"]] = dict(ln.split("=", 1) for ln in (tmp / "out.txt").read_text().splitlines() if ln)
        ran.append((step["name"], n, r.stdout + r.stderr))
    return {"ran": ran, "outputs": outputs}


@pytest.mark.slow
def test_workflow_steps_run_by_hand_on_cpu(tmp_path):
    """The GPU workflow's own shell, step by step, for a pull request and then for a push to main (with a memory
    baseline recorded in between, as a maintainer does for a new GPU model): every step exits 0, and what the
    upload step keeps is whole: the comparison, the gate's report, the history page with its plots, and the
    report's link to that page resolving inside what is uploaded (the runner's own history folder is not)."""
    import re

    from bench.compare import checkout

    repo = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(WORKFLOWS[0].parents[2]), str(repo)], check=True)
    checkout(WORKFLOWS[0].parents[2], None, repo)  # the working tree as it is, over the clone's last commit
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()

    pr = _run_workflow("pull_request", repo, tmp_path, sha)
    names = [n for n, _, _ in pr["ran"]]
    assert names[:3] == ["GPU tests first", "Device name", "Speed, head against base on this runner"]
    assert "History (pushes to main)" not in names
    assert "gpu-tests: ok" in pr["ran"][0][2] and (repo / "results" / "gpu-check" / "summary.md").is_file()
    assert pr["outputs"]["device"]["slug"] == "cpu"
    assert sum(n for _, n, _ in pr["ran"]) == 2  # the compare step's grid and the run step's were both replaced
    compare_md = (repo / "results" / "compare" / "compare.md").read_text()
    assert "bptt_m" in compare_md
    assert "no memory baseline baselines/gpu-cpu.parquet" in pr["ran"][-1][2]
    assert "FAIL" not in (repo / "results" / "ci_gpu" / "gate.md").read_text()

    # a maintainer records this GPU model's baseline; then a push to main
    subprocess.run([sys.executable, "run_bench.py", "baseline", "results/ci_gpu", "baselines/gpu-cpu.parquet"],
                   cwd=repo, check=True, capture_output=True)
    push = _run_workflow("push", repo, tmp_path, sha)
    names = [n for n, _, _ in push["ran"]]
    assert "Speed, head against base on this runner" not in names and names[-1] == "History (pushes to main)"
    gate = (repo / "results" / "ci_gpu" / "gate.md").read_text()
    assert "no memory baseline" not in push["ran"][-2][2] and "peak" in gate.lower()

    upload = next(st for st in _gate_steps() if st.get("uses", "").startswith("actions/upload-artifact"))
    uploaded = [repo / p.strip() for p in upload["with"]["path"].splitlines() if p.strip()]
    assert (repo / "results" / "history" / "history.html").is_file()
    for img in re.findall(r"src='([^']+)'", (repo / "results" / "history" / "history.html").read_text()):
        assert (repo / "results" / "history" / img).is_file(), img
    index = repo / "results" / "ci_gpu" / "report" / "index.html"
    links = re.findall(r"href='([^'#][^']*)'", index.read_text())
    assert any(ln.endswith("history.html") for ln in links), links
    for ln in links:
        target = (index.parent / ln).resolve()
        assert target.is_file() and any(target.is_relative_to(u.resolve()) for u in uploaded), (ln, target)
