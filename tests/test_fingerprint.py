"""A cell's identity includes its code: the fingerprint, staleness on rerun, --reuse-stale, and `status`."""

import io
import random
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from bench import fingerprint as fp
from bench.fingerprint import code_hash, fingerprint, normalised_source, source_files
from reports.results import load_results

from .helpers import tiny_grid

REPO = Path(__file__).resolve().parents[1]


def _copy_sources(dst: Path) -> Path:
    for s in ("methods", "bench", "reports", "grids"):
        shutil.copytree(REPO / s, dst / s, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "run_bench.py", dst / "run_bench.py")
    return dst


def _strip_comments(text: str) -> str:
    """The same program without a single comment, by the tokenizer (not by the AST the fingerprint uses)."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type != tokenize.COMMENT]
    return tokenize.untokenize(toks)


def test_comments_blank_lines_and_docstrings_keep_the_hash(tmp_path):
    root = _copy_sources(tmp_path / "copy")
    assert code_hash(root) == code_hash(REPO)
    rng = random.Random(0)
    for p in source_files(root):
        text = _strip_comments(p.read_text())
        lines = text.splitlines()
        for _ in range(3):  # blank lines and new comments anywhere outside a bracketed expression or string
            i = rng.randrange(len(lines) + 1)
            if i == len(lines) or (lines[i].strip() and not lines[i].rstrip().endswith(("(", "[", "{", ",", "\\"))
                                   and '"""' not in lines[i]):
                lines.insert(i, "# a new comment")
        p.write_text("\n".join(lines) + "\n")
    neuron = root / "methods" / "neuron.py"
    neuron.write_text(neuron.read_text().replace('"""One LIF neuron model.', '"""One LIF neuron model (reworded).'))
    assert code_hash(root) == code_hash(REPO)


def test_any_code_change_changes_the_hash(tmp_path):
    root = _copy_sources(tmp_path / "copy")
    neuron = root / "methods" / "neuron.py"
    neuron.write_text(neuron.read_text().replace("decay: float = 0.2", "decay: float = 0.25"))
    assert code_hash(root) != code_hash(REPO)
    root2 = _copy_sources(tmp_path / "copy2")
    runner = root2 / "bench" / "runner.py"
    runner.write_text(runner.read_text() + "\nEXTRA = 1\n")
    assert code_hash(root2) != code_hash(REPO)


def _edit(root: Path, rel: str) -> None:
    """A change of code (not of a comment) at the end of one file."""
    (root / rel).write_text((root / rel).read_text() + "\nEDITED = 1\n")


# modules whose code changes a row's numbers, though an earlier hand-kept list of sources left them out
RESULT_MODULES = ("bench/energy.py", "bench/ops.py", "bench/fidelity.py", "bench/distributed.py", "bench/rows.py",
                  "bench/env.py", "bench/worker.py", "methods/syncbn.py")
# modules that schedule, store, gate or report: a change there keeps every stored result
HARNESS_MODULES = ("bench/launch.py", "bench/check.py", "bench/compare.py", "bench/status.py", "bench/slurm.py",
                   "bench/grid.py", "bench/spawn.py", "reports/render.py", "reports/results.py", "run_bench.py")


@pytest.mark.parametrize("rel", RESULT_MODULES)
def test_an_edit_of_a_module_a_cell_runs_makes_cells_stale(tmp_path, rel):
    root = _copy_sources(tmp_path / "copy")
    _edit(root, rel)
    assert code_hash(root) != code_hash(REPO)


def test_an_edit_of_the_launcher_gate_or_reports_keeps_cells_fresh(tmp_path):
    root = _copy_sources(tmp_path / "copy")
    for rel in HARNESS_MODULES:
        _edit(root, rel)
    assert code_hash(root) == code_hash(REPO)


def test_a_new_module_that_a_cell_imports_is_hashed_without_a_list(tmp_path):
    """A module added later and imported lazily by the runner is found by the walk, as is one the runner starts
    as a process (`-m`); one nothing imports is not."""
    root = _copy_sources(tmp_path / "copy")
    (root / "bench" / "newmeter.py").write_text("FACTOR = 2\n")
    (root / "bench" / "newproc.py").write_text("X = 1\n")
    (root / "bench" / "unused.py").write_text("Y = 1\n")
    runner = root / "bench" / "runner.py"
    runner.write_text(runner.read_text() + "\n\ndef _later():\n    from .newmeter import FACTOR\n\n    return FACTOR\n"
                      "\n\nCMD = ['python', '-m', 'bench.newproc']\n")
    names = {p.relative_to(root).as_posix() for p in source_files(root)}
    assert {"bench/newmeter.py", "bench/newproc.py"} <= names and "bench/unused.py" not in names
    before = code_hash(root)
    (root / "bench" / "newmeter.py").write_text("FACTOR = 3\n")
    assert code_hash(root) != before


_IMPORTED = """
import json, sys
from pathlib import Path
from bench.cell import Cell
from bench.runner import run_cell
base = dict(method="bptt_m", arch="mlp", dataset="digits", T=2, batch_size=16, train_subset=32,
            arch_options={"widths": [8]}, warmup_steps=0)
for cell in (Cell(**base, kind="train", epochs=1), Cell(**base, kind="profile", steps=2),
             Cell(**base, kind="fidelity", steps=1, reference="bptt_m")):
    res = run_cell(cell, None, None, out=Path(sys.argv[1]))
    assert res.status == "ok", res.row.get("error")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("bench", "methods"))))
"""


def test_every_module_a_cell_imports_is_hashed_or_named(tmp_path):
    """A train, a profile and a fidelity cell run in a fresh interpreter: each module of bench/ or methods/ that
    they imported is hashed, or named in NOT_RESULTS with its reason. A module the walk missed fails here."""
    import json

    r = subprocess.run([sys.executable, "-c", _IMPORTED, str(tmp_path / "res")], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    imported = set(json.loads(r.stdout.splitlines()[-1]))
    hashed = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
              for p in source_files(REPO)}
    named = set(getattr(fp, "NOT_RESULTS", {}))
    assert {"bench.energy", "bench.ops", "bench.fidelity", "bench.distributed", "bench.runner"} <= imported
    assert imported - hashed - named == set()
    assert all(len(why) > 20 for why in fp.NOT_RESULTS.values())  # each says why


def test_fingerprint_names_torch_and_device_type():
    a = fingerprint("cpu", "2.14.1", code="x")
    assert a != fingerprint("cuda", "2.14.1", code="x") and a != fingerprint("cpu", "2.15.0", code="x")
    assert fingerprint("cuda:3", "2.14.1", code="x") == fingerprint("cuda", "2.14.1", code="x")
    assert normalised_source("x = 1  # one\n") == normalised_source("\n\nx = (1)\n")


GRID = tiny_grid("fp")


def _cli(root: Path, *args):
    return subprocess.run([sys.executable, str(root / "run_bench.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=root, timeout=300)


@pytest.mark.slow
def test_rerun_after_a_code_change_reruns_stale_cells(tmp_path):
    """Through the CLI of a copy of the project: a comment-only edit keeps the cell; an edit of the rbp preset's
    decay makes it stale: --reuse-stale keeps it (status, report and check say so), a plain rerun runs it again."""
    root = _copy_sources(tmp_path / "proj")
    grid, out = tmp_path / "fp.toml", tmp_path / "res"
    grid.write_text(GRID)
    r = _cli(root, "run", grid, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    fp0 = load_results(out)["code_fingerprint"].iloc[0]
    assert isinstance(fp0, str) and len(fp0) == 16

    neuron = root / "methods" / "neuron.py"
    neuron.write_text(neuron.read_text().replace("    # rate-BP paper:", "    # (a comment edit) rate-BP paper:"))
    r = _cli(root, "run", grid, "--out", out, "--device", "cpu")
    assert r.returncode == 0 and "1 cell(s) already stored with status ok: skipped" in r.stderr, r.stderr
    assert "ok" in _cli(root, "status", out).stdout.splitlines()[0].split(", ")[0]

    neuron.write_text(neuron.read_text().replace('"rbp": NeuronConfig(name="rbp")', '"rbp": NeuronConfig(decay=0.3, name="rbp")'))
    r = _cli(root, "run", grid, "--out", out, "--device", "cpu", "--reuse-stale")
    assert r.returncode == 0 and "1 cell(s) stale (code changed since they ran): kept" in r.stderr, r.stderr
    s = _cli(root, "status", out)
    assert s.returncode == 0 and s.stdout.startswith("1 cell(s): 0 ok, 1 stale, 0 failed, 0 missing, 0 running"), s.stdout
    rep = _cli(root, "report", out)
    assert rep.returncode == 0 and "1 cell(s) are stale" in rep.stdout, rep.stdout + rep.stderr
    base = tmp_path / "base.parquet"
    load_results(out).drop(columns=["stale"]).to_parquet(base)
    chk = _cli(root, "check", "--baseline", base, "--results", out)
    assert chk.returncode == 0 and "1 result cell(s) stale" in chk.stdout and "stale: measured by older code" in chk.stdout

    r = _cli(root, "run", grid, "--out", out, "--device", "cpu")
    assert r.returncode == 0 and "1 cell(s) stale (code changed since they ran): rerunning" in r.stderr, r.stderr
    fp1 = load_results(out)["code_fingerprint"].iloc[0]
    assert fp1 != fp0
    assert _cli(root, "status", out).stdout.startswith("1 cell(s): 1 ok, 0 stale")


def test_status_lists_every_state(tmp_path):
    """ok, stale, failed and missing from a folder written here: the manifest asks for four cells."""
    import json

    from bench.fingerprint import fingerprint
    from reports.results import update_manifest, write_cell

    out = tmp_path / "res"
    base = {"arch": "mlp", "dataset": "digits", "seed": 0, "device": "cpu"}
    cfgs = {f"k{T}": {**base, "method": "bptt_m", "T": T} for T in (1, 2, 3, 4)}
    update_manifest(out, "g", cfgs, {"cpu": fingerprint("cpu")})
    write_cell(out, "k1", {"key": "k1", "status": "ok", **cfgs["k1"], "code_fingerprint": fingerprint("cpu")})
    write_cell(out, "k2", {"key": "k2", "status": "ok", **cfgs["k2"], "code_fingerprint": "0123456789abcdef"})
    write_cell(out, "k3", {"key": "k3", "status": "error", **cfgs["k3"], "error": "ValueError: boom"})
    r = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "status", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "4 cell(s): 1 ok, 1 stale, 1 failed, 1 missing, 0 running"
    table = {l.split()[0]: l for l in r.stdout.splitlines()[3:]}
    assert "T=1" in table["ok"] and "T=2" in table["stale"] and "error: ValueError: boom" in table["failed"]
    assert "T=4" in table["missing"]
    assert json.loads((out / "manifest.json").read_text())["code_fingerprints"] == {"cpu": fingerprint("cpu")}
    bad = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "status", str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a results folder" in bad.stderr and "Traceback" not in bad.stderr
