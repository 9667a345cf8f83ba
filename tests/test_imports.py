"""The import graph: no circle among the modules of methods/ and bench/ (lazy imports inside functions count),
and the commands that only read results (report, check, history, status, baseline) never import torch."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from bench.fingerprint import DISCOVERED, PACKAGES, imports_of, package_modules

from .helpers import REPO, cpu_baseline_rows, write_rows


def _graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports, anywhere in its source; a package whose __init__ imports all
    its modules at run time (DISCOVERED: methods, through METHODS) imports each of them, as the fingerprint counts."""
    mods = [m for pkg in PACKAGES for m in package_modules(root, pkg)]
    graph = {m: imports_of(root, m) for m in mods}
    for pkg in DISCOVERED:
        graph[pkg] |= set(package_modules(root, pkg)) - {pkg}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), each a circle of imports."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_finds_lazy_and_relative_imports():
    g = _graph()
    assert "bench.runner" in g["bench.worker"]  # `from .runner import run_cell` inside main()
    assert "bench.spawn" in g["bench.worker"]
    assert "methods.triton_lif" in g["methods.online"]  # inside a function
    assert "methods.syncbn" in g["methods.layers"] and "bench.rows" in g["bench.distributed"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_in_methods_and_bench():
    assert _cycles(_graph()) == []


# --------------------------------------------------------------------------- commands that need no torch

_BLOCKER = '''
import os, sys

class _NoTorch:
    """Any import of torch (or of a module of it) fails, and is recorded, in this interpreter."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            with open(os.environ["SNNBENCH_TORCH_TRIED"], "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"torch is not installed here (blocked by the test): {name}")
        return None

sys.meta_path.insert(0, _NoTorch())
'''


def no_torch_env(tmp_path: Path) -> tuple[dict, Path]:
    """An environment in which Python refuses to import torch and records every try (a sitecustomize on
    PYTHONPATH): the commands run as on a laptop that holds a copied results folder and no torch."""
    site = tmp_path / "notorch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER)
    tried = tmp_path / "torch-tried.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "SNNBENCH_TORCH_TRIED": str(tried),
           "MPLBACKEND": "Agg"}
    return env, tried


def _run(env, *args):
    return subprocess.run([sys.executable, str(REPO / "run_bench.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "report" not in p.parts}


def test_reading_commands_import_no_torch(tmp_path):
    env, tried = no_torch_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr  # the blocker works
    tried.unlink()
    res = write_rows(tmp_path / "res", cpu_baseline_rows())  # the CPU baseline's 20 real cells
    before = _digest(res)
    runs = {
        "report": _run(env, "report", res),
        "check": _run(env, "check", "--baseline", REPO / "baselines" / "cpu.parquet", "--results", res,
                      "--invariants", res),
        "baseline": _run(env, "baseline", res, tmp_path / "b.parquet"),
        "history": _run(env, "history", tmp_path / "hist", "--add", res, "--commit", "abc1234"),
        "status": _run(env, "status", res),
    }
    for name, r in runs.items():
        assert r.returncode == 0, f"{name}: rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, f"{name}: {r.stderr[-3000:]}"
    assert not tried.exists(), f"torch was imported: {tried.read_text()}"
    assert "gate passed" in runs["check"].stdout and "20 matched cells" in runs["check"].stdout
    assert (res / "report" / "index.html").is_file() and (tmp_path / "hist" / "history.html").is_file()
    assert runs["status"].stdout.startswith("20 cell(s): ")
    assert _digest(res) == before  # reading changed nothing
