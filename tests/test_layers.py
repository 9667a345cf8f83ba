"""The layers import one way: methods <- bench -> reports.results; reports imports neither torch, bench nor methods."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _modules(package: str) -> list[str]:
    root = REPO / package
    return sorted(package + "." + ".".join(p.relative_to(root).with_suffix("").parts).replace(".__init__", "")
                  for p in root.rglob("*.py"))


@pytest.mark.parametrize("layer,blocked,also_absent", [
    ("reports", ("torch", "bench", "methods", "run_bench"), ()),
    ("methods", ("bench", "reports", "run_bench"), ()),
    ("bench", ("run_bench",), ("reports.render", "reports.figures", "reports.tables", "reports.aggregate")),
])
def test_each_layer_imports_without_the_layers_above_it(layer, blocked, also_absent):
    """Every module of a layer imports with the layers it must not use made unimportable; bench uses reports only
    through the result store."""
    mods = [m.removesuffix(".__init__") for m in _modules(layer)]
    code = ("import sys\n"
            f"for m in {list(blocked)!r}:\n    sys.modules[m] = None  # importing it now raises ImportError\n"
            f"for m in {mods!r}:\n    __import__(m)\n"
            f"bad = [m for m in {list(also_absent)!r} if m in sys.modules]\n"
            "assert not bad, bad\nprint(len(" + repr(mods) + "))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.strip()) == len(mods) >= 3
