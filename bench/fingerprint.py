"""The code fingerprint of a result: which code, torch and device type produced it.

A cell's key hashes its configuration; its fingerprint hashes what else can change its numbers: the source
that a cell's process runs, plus the torch version and the device type. What a cell runs is found, not listed:
``cell_modules`` follows every import (at the top of a module or inside a function) and every process started
with ``-m`` from the worker (``CELL_ENTRY``), within ``bench/`` and ``methods/``; ``methods/`` counts whole,
because its ``METHODS`` registry imports each of its modules at run time. The few modules of that closure which
change no number of a row are named once, each with the reason, in ``NOT_RESULTS``. So a new module that a cell
imports is hashed without an edit here, and a test runs cells of every kind and fails when one imported a
module that is neither hashed nor named there.

The source is hashed as a normalised syntax tree (``ast.dump`` without line numbers, docstrings removed), so an
edit of comments, docstrings or layout keeps results fresh, and any edit of code makes them stale.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from functools import lru_cache
from pathlib import Path

from . import REPO

PACKAGES = ("bench", "methods")  # where the harness's and the methods' own code lives
CELL_ENTRY = "bench.worker"  # the process that runs one cell (bench/spawn.py starts it; so do Slurm tasks)
DISCOVERED = ("methods",)  # packages whose __init__ imports every module of theirs at run time (METHODS)
# modules a cell's process imports that change no number of its row, and why
NOT_RESULTS = {
    "bench.spawn": "starts a cell's worker and stores the row of one that died; the worker measures",
    "bench.fingerprint": "names the code that made a row: it hashes that code and changes nothing in the row",
    "bench.errors": "exception classes: the messages a user reads",
    "bench.stop": "the stop flag: when a cell stops (at a step boundary, after a checkpoint), never what it measures",
}


def module_file(root: Path, name: str) -> Path | None:
    """The file of module ``name`` under ``root`` (a package's ``__init__.py``), or None."""
    p = root.joinpath(*name.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imports_of(root: Path, name: str, processes: bool = False) -> set[str]:
    """The modules of ``PACKAGES`` that module ``name`` imports, anywhere in it (lazy imports inside functions
    too), resolved as Python resolves them; ``from pkg import sub`` names the submodule where there is one. With
    ``processes``, also the modules it starts as processes (a ``"-m", "bench.x"`` pair in its source)."""
    path = module_file(root, name)
    if path is None:
        return set()
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def add(mod: str) -> None:
        if mod.split(".")[0] in PACKAGES and module_file(root, mod) is not None:
            found.add(mod)

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            add(mod)
            for alias in node.names:
                add(f"{mod}.{alias.name}")
        elif processes and isinstance(node, (ast.List, ast.Tuple)):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            for flag, target in zip(items, items[1:]):
                if flag == "-m" and isinstance(target, str):
                    add(target)
    found.discard(name)
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def package_modules(root: Path, package: str) -> list[str]:
    """Every module of ``package`` under ``root``, subpackages included."""
    base = root.joinpath(*package.split("."))
    return sorted(_module_name(root, p) for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def cell_modules(root: Path = REPO) -> set[str]:
    """What a cell's process runs within ``PACKAGES``: the closure of ``CELL_ENTRY``'s imports and the processes
    they start, parent packages included (importing ``a.b`` runs ``a``), every module of a ``DISCOVERED`` package
    that is reached."""
    seen: set[str] = set()
    todo = [CELL_ENTRY]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        nxt = imports_of(root, name, processes=True) | set(_parents(name))
        if name in DISCOVERED:
            nxt |= set(package_modules(root, name))
        todo += [m for m in nxt if m not in seen and module_file(root, m) is not None]
    return seen


def source_files(root: Path = REPO) -> list[Path]:
    """The files whose code can change a cell's numbers: ``cell_modules`` less ``NOT_RESULTS``."""
    return sorted(module_file(root, m) for m in cell_modules(root) if m not in NOT_RESULTS)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalised_source(text: str) -> str:
    """The syntax tree of ``text`` as a string, without comments, docstrings, line numbers or layout."""
    return ast.dump(_strip_docstrings(ast.parse(text)), annotate_fields=False, include_attributes=False)


def code_hash(root: Path = REPO) -> str:
    """sha256 over the normalised source of every result-changing file (with its path under ``root``)."""
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(normalised_source(p.read_text()).encode() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def _repo_code_hash() -> str:
    return code_hash(REPO)


def is_current(code_fingerprint, device) -> bool:
    """Whether a stored row's fingerprint is this checkout's for the row's device (False for a row without one)."""
    from reports.results import device_type

    return isinstance(code_fingerprint, str) and code_fingerprint == _current(device_type(device))


@lru_cache(maxsize=None)
def _current(device_type: str) -> str:
    return fingerprint(device_type)


def fingerprint(device_type: str, torch_version: str | None = None, code: str | None = None) -> str:
    """16 hex digits naming the code, the torch version and the device type ('cpu', 'cuda') of a result."""
    if torch_version is None:
        torch_version = installed_torch_version()
    blob = "\0".join((code or _repo_code_hash(), str(torch_version), device_type.split(":")[0]))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def installed_torch_version() -> str:
    """``torch.__version__`` of the torch this interpreter would import, read from its ``torch/version.py``
    without importing torch (``status`` and the reports run without it); ``"none"`` where there is no torch.
    (The distribution's metadata says 2.14.1 where torch says 2.14.1+cu130, so it cannot stand in.)"""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    for entry in sys.path:
        version = Path(entry or ".", "torch", "version.py")
        try:
            tree = ast.parse(version.read_text())
        except (OSError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "__version__" for t in targets):
                    return str(node.value.value)
    return "none"
