"""The GitHub workflow is read by GitHub: it is checked against GitHub's workflow schema by check-jsonschema, and
the commands its steps run exist in our command line."""

import shutil
import subprocess
from pathlib import Path

import pytest

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
        build_parser().parse_args(argv)  # exits (SystemExit) on an unknown command or option
