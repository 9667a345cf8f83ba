"""The code fingerprint of a result: which code, torch and device type produced it.

A cell's key hashes its configuration; its fingerprint hashes what else can change its numbers: the
source of ``methods/`` and of the parts of ``bench/`` that train and measure (``RESULT_SOURCES``), plus the
torch version and the device type. The source is hashed as a normalised syntax tree (``ast.dump``
without line numbers, docstrings removed), so an edit of comments, docstrings or layout keeps results
fresh, and any edit of code makes them stale.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# what can change a result: the methods, and bench's training loop, data, profilers and samplers
# (grid expansion, launching, the store, the gate and the command line cannot: a change there keeps results)
RESULT_SOURCES = ("methods", "bench/runner.py", "bench/profile.py", "bench/sampler.py", "bench/nvml_sampler.py",
                  "bench/data.py", "bench/datasets.py", "bench/checkpoint.py")


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


def source_files(root: Path = REPO) -> list[Path]:
    files: list[Path] = []
    for s in RESULT_SOURCES:
        p = root / s
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return files


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
        import torch

        torch_version = torch.__version__
    blob = "\0".join((code or _repo_code_hash(), str(torch_version), device_type.split(":")[0]))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
