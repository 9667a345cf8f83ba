"""The speed gate: two versions of the code measured side by side on this machine, decided by statistics.

``run_bench.py compare BASE [HEAD] --grid GRID``: BASE and HEAD are git revisions (HEAD: the working tree, with its
uncommitted changes). Each side's files are copied out (``git archive``; for the working tree the files git tracks
or would track) and run from this environment. Every profile cell of the grid runs for both sides, ``rounds`` times,
each round in a fresh worker process per side (bench/compare_worker.py). The two workers take turns step by step
(A B B A A B ...), so the k-th steps of the two sides are measured next to each other and whatever slows the machine
for a while slows both.

The decision, per cell: the per-step times of each side are paired by (round, step); two consecutive pairs of a
round form an ABBA quartet (one step with the base first, one with the head first: the side that runs second pays for
the caches the other left, ~30% on a 25 ms step of this 2-core CPU, and in a quartet that cancels), and each
quartet gives a log ratio head/base. The cell's ratio is exp(median of its quartets' log ratios), with a 95%
percentile bootstrap interval that resamples the quartets (``scipy.stats.bootstrap``). A comparison runs an even
number of steps per cell (one more where the grid's is odd), so every step is in a quartet. A regression is an
interval whose lower end is above 1 + threshold, an improvement one whose upper end is below 1 - threshold; anything
else is "no change", printed with the interval and the smallest slowdown this run could have detected,
(1 + threshold) * ratio / lower - 1. Metrics that do not vary between runs (bytes saved for backward, parameters)
are compared with the metric table's tolerances.

A "slower" verdict is then confirmed: the cells it rests on (the cell, or every cell of a method slower over its cells)
run again for ``confirm_rounds`` fresh rounds, and the verdict stands only when those new steps alone give it too;
otherwise the line says "not confirmed" and the gate passes. A round's workers share a state (where their memory
landed, what the machine did meanwhile) that the pairs of that round do not average out, so one comparison's false
alarms come in rounds; a second, independent set of rounds makes a false alarm need two, while a real slowdown shows in
both. ``benchmarks/calibrate_compare.py`` measures the false-alarm and detection rates of this rule.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from reports.results import METRIC, atomic_write_parquet, write_atomic

from . import REPO, forkserver
from .cell import CELL_FIELDS, Cell
from .errors import UsageError

PREFIX = "@cmp "
# what a side needs to run a cell: the three packages (and what marks the root); grids, tests, data stay behind
CODE_PATHS = ("bench", "methods", "reports", "run_bench.py", "pyproject.toml")
# what the gate compares exactly (within the metric table's tolerance) besides time
EXACT_METRICS = ("saved_for_backward_mib", "num_params")
DEFAULT_THRESHOLD_PCT = 5.0
CONFIDENCE = 0.95
MIN_QUARTETS = 3  # a cell with fewer ABBA quartets is not judged ("too few steps")
WORKER_TIMEOUT_S = 600.0  # a side's worker silent this long (set-up, one step, a cell's bookkeeping) is killed


# ---------------------------------------------------------------- the two sides' code

def git(repo: Path, *args: str, binary: bool = False) -> str | bytes:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=not binary)
    if r.returncode != 0:
        err = r.stderr.decode() if binary else r.stderr
        raise UsageError(f"git {' '.join(args)}: {err.strip() or 'failed'}")
    return r.stdout


def resolve(repo: Path, rev: str) -> str:
    """The commit a revision names, or a UsageError (exit 2) saying it is unknown here."""
    if not (repo / ".git").exists() and subprocess.run(["git", "-C", str(repo), "rev-parse", "--git-dir"],
                                                       capture_output=True).returncode != 0:
        raise UsageError(f"{repo} is not a git checkout: compare needs the project's history")
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise UsageError(f"unknown revision {rev!r} in {repo} (a shallow clone lacks older commits: "
                         "git fetch --unshallow)")
    return r.stdout.strip()


def checkout(repo: Path, rev: str | None, dest: Path, paths: tuple[str, ...] | None = None) -> str:
    """Copy a revision's files (``rev``) or the working tree's (``None``: tracked and untracked-but-not-ignored files,
    as they are now, uncommitted edits included) into ``dest``, all of them or only those under ``paths``; returns a
    label naming what was copied."""
    dest.mkdir(parents=True, exist_ok=True)
    if rev is not None:
        sha = resolve(repo, rev)
        present = [p for p in paths or () if git(repo, "ls-tree", "--name-only", sha, p).strip()]
        data = git(repo, "archive", "--format=tar", sha, *(present if paths else []), binary=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
        return f"{rev} ({sha[:10]})" if rev != sha else sha[:10]
    resolve(repo, "HEAD")
    names = [n for n in git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                              *(paths or ())).split("\0") if n]
    for n in names:
        src = repo / n
        if src.is_file():
            (dest / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / n)
    dirty = [ln for ln in git(repo, "status", "--porcelain").splitlines() if ln.strip()]
    head = git(repo, "rev-parse", "--short=10", "HEAD").strip()
    return f"working tree (HEAD {head}" + (f" + {len(dirty)} uncommitted change(s))" if dirty else ")")


# ---------------------------------------------------------------- running both sides, step by step

class SideFailed(RuntimeError):
    def __init__(self, message: str, side: str | None = None) -> None:
        super().__init__(message)
        self.side = side


class SideWorker:
    """A worker process running one side's code (see bench/compare_worker.py for the protocol). A worker that
    sends nothing for ``timeout_s`` seconds (a side that hangs: a deadlock, a step that never ends) is killed and
    counts as a worker that died in that cell."""

    def __init__(self, name: str, root: Path, script: Path, env: dict | None = None,
                 timeout_s: float | None = None, server: forkserver.ForkServer | None = None) -> None:
        self.name, self.root, self.timeout_s = name, root, timeout_s
        if server is not None:  # a child of the side's fork server, which imported the side's tree
            self.proc = server.spawn(script=str(script), cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        else:
            self.proc = subprocess.Popen([sys.executable, str(script)], cwd=root, env=side_env(root, env),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()  # the worker's stdout, line by line ("" at its end)
        # its stderr's last lines, read as they come so that the pipe never fills and blocks the worker
        self.err: collections.deque = collections.deque(maxlen=50)
        threading.Thread(target=self._pump, daemon=True).start()
        self._err_pump = threading.Thread(target=self.err.extend, args=(self.proc.stderr,), daemon=True)
        self._err_pump.start()
        ready = self.read()
        bench_dir = Path(ready.get("bench", "")).resolve()
        if bench_dir != (root / "bench").resolve():
            self.close()
            raise SideFailed(f"side {name}: its worker imported {bench_dir}, not {root / 'bench'}")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def read(self) -> dict:
        while True:
            try:
                line = self.lines.get(timeout=self.timeout_s)
            except queue.Empty:
                self.proc.kill()
                self.proc.wait()
                raise SideFailed(f"side {self.name}: worker sent nothing for {self.timeout_s:g} s (killed)",
                                 self.name) from None
            if not line:
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:  # pragma: no cover - closed its stdout and went on
                    self.proc.kill()
                    self.proc.wait()
                self._err_pump.join(timeout=5)
                last = [ln.strip() for ln in self.err if ln.strip()]
                raise SideFailed(f"side {self.name}: worker ended: {last[-1] if last else ''}", self.name)
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])

    def send(self, obj) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except OSError:  # the worker is gone: read() says why
            pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a worker that ignores a closed stdin
            self.proc.kill()
            self.proc.wait()


def side_env(root: Path, env: dict | None) -> dict:
    """A side's workers' environment: this one's, the side's own variables, and the side's tree on the path."""
    return {**os.environ, **(env or {}), "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}


def cell_message(cell: Cell) -> dict:
    """The cell for a side's worker: its identity and every field that differs from this checkout's default. A
    side whose code predates a field (say, ``checkpoint_minutes``) then builds the same cell with its own
    defaults; one that cannot honour a field the cell sets fails that cell, naming it."""
    out = {}
    for name, f in CELL_FIELDS.items():
        v = getattr(cell, name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is dataclasses.MISSING or v != default or name == "device":
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def even_steps(cell: Cell) -> Cell:
    """The cell as a comparison runs it: an even number of timed steps (one more where the grid's is odd), so
    every step belongs to an ABBA quartet (``quartets``). Its rows and steps stay under the grid cell's key."""
    return dataclasses.replace(cell, steps=cell.steps + cell.steps % 2) if cell.steps % 2 else cell


def run_cell_interleaved(workers: list[SideWorker], cell: Cell) -> dict[str, dict]:
    """Run one cell on every side, the sides taking turns step by step: step k in the order of ``workers`` for
    even k and the reverse for odd k (A B B A ...). The first step (a warm-up or the memory step, never timed) runs
    on all sides at once, after their set-up; from then on one worker runs at a time, a cell's closing bookkeeping
    included (a worker that reported its last step finishes the cell on its next "go"). Returns
    side -> {"row": ..., "series": ...}."""
    cfg = cell_message(cell)
    for w in workers:
        w.send({"cell": cfg})
    results: dict[str, dict] = {}
    waiting: list[SideWorker] = []
    for w in workers:  # set-up and step 1, concurrently
        msg = w.read()
        if "result" in msg:
            results[w.name] = msg["result"]
        else:
            waiting.append(w)
    k = 1
    while waiting:
        k += 1
        order = waiting if k % 2 == 0 else waiting[::-1]
        still = []
        for w in order:
            w.send("go")
            msg = w.read()
            if "result" in msg:  # ran its last step (or failed) and finished the cell
                results[w.name] = msg["result"]
            else:
                still.append(w)
        waiting = [w for w in waiting if w in still]
    return results


@dataclass
class Comparison:
    cells: list[Cell]
    sides: dict[str, str]  # name -> label
    steps: pd.DataFrame  # side, round, key, step, step_ms
    rows: pd.DataFrame  # side, round, key, and the row's fields
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    crashes: list[dict] = field(default_factory=list)  # a side's worker died in a cell: key, round, side, error


def measure(roots: dict[str, Path], labels: dict[str, str], cells: list[Cell], rounds: int,
            progress: Callable[[str], None] | None = None, env: dict[str, dict] | None = None,
            timeout_s: float = WORKER_TIMEOUT_S) -> Comparison:
    """Run every cell on every side ``rounds`` times (fresh workers per round; the sides' order and the cells'
    order reverse every round) and collect the per-step times and rows. A worker silent for ``timeout_s`` seconds
    is killed (``SideWorker``)."""
    progress = progress or (lambda s: None)
    names = list(roots)
    steps, rows, failures, crashes = [], [], [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snnbench-cmp-") as tmp, ExitStack() as servers:
        script = Path(tmp) / "compare_worker.py"
        shutil.copy2(Path(__file__).with_name("compare_worker.py"), script)
        # a fork server per side, run from a copy of bench/forkserver.py with the side's tree on the path: each
        # round's workers are its children, and import nothing of their own
        served = {}
        if forkserver.available():
            shutil.copy2(forkserver.__file__, Path(tmp) / "forkserver.py")
            for n in names:
                served[n] = servers.enter_context(forkserver.ForkServer(
                    roots[n], env=side_env(roots[n], (env or {}).get(n)), script=Path(tmp) / "forkserver.py"))

        def start(n: str, stack: ExitStack) -> SideWorker:
            w = SideWorker(n, roots[n], script, (env or {}).get(n), timeout_s, served.get(n))
            stack.callback(w.close)
            return w

        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            todo = cells if r % 2 == 0 else cells[::-1]
            with ExitStack() as stack:
                workers = [start(n, stack) for n in order]
                for i, cell in enumerate(todo, 1):
                    progress(f"round {r + 1}/{rounds}, cell {i}/{len(todo)}: {cell.label}")
                    try:
                        res = run_cell_interleaved(workers, even_steps(cell))
                    except SideFailed as e:  # a side's worker died: this cell and round are lost for all sides
                        failures.append(f"{cell.label}, round {r + 1}: {e}")
                        crashes.append({"key": cell.key, "round": r, "side": e.side, "error": str(e)})
                        for w in workers:
                            w.close()
                        workers[:] = [start(n, stack) for n in order]
                        continue
                    for side, out in res.items():
                        rows.append({**out["row"], "side": side, "round": r, "key": cell.key})
                        for j, ms in enumerate(out["series"].get("step_ms") or []):
                            steps.append({"side": side, "round": r, "key": cell.key, "step": j, "step_ms": ms})
    return Comparison(cells, dict(labels), pd.DataFrame(steps, columns=["side", "round", "key", "step", "step_ms"]),
                      pd.DataFrame(rows), time.perf_counter() - t0, failures, crashes)


# ---------------------------------------------------------------- the decision

@dataclass(frozen=True)
class Decision:
    ratio: float  # median(head) / median(base)
    low: float
    high: float
    n: int  # pairs
    verdict: str  # "slower" | "faster" | "no change" | "too few steps"
    detectable: float  # the smallest slowdown (a fraction) this run could have called a regression


def _verdict(point: float, low: float, high: float, n: int, threshold: float) -> Decision:
    if low > 1 + threshold:
        verdict = "slower"
    elif high < 1 - threshold:
        verdict = "faster"
    else:
        verdict = "no change"
    detectable = (1 + threshold) * point / low - 1 if low > 0 else math.inf
    return Decision(point, low, high, n, verdict, detectable)


def quartets(base_ms, head_ms, steps=None, rounds=None) -> np.ndarray:
    """The log head/base ratios of a cell's ABBA quartets: two consecutive steps of a round, one taken with the
    base first and one with the head first, averaged in log. The sides take turns step by step and the order flips
    every step (``run_cell_interleaved``), so whichever side runs second after the other pays for the caches the
    other left: on this 2-core CPU a 25 ms step taken second is ~30% slower than one taken first, and single pairs
    swing by that much one way and the other (log-ratio sd 0.3). A quartet holds one of each, so that swing cancels
    in it (sd 0.05). ``steps``/``rounds`` give each pair's step index and round (a quartet is steps 2q and 2q + 1
    of one round, both measured); without them the pairs are consecutive steps of one round."""
    b, h = np.asarray(base_ms, float), np.asarray(head_ms, float)
    n = min(len(b), len(h))
    lr = np.log(h[:n] / b[:n])
    if steps is None:
        m = n // 2 * 2
        return (lr[0:m:2] + lr[1:m:2]) / 2
    ids = pd.Series(lr).groupby([np.asarray(rounds)[:n], np.asarray(steps)[:n] // 2])
    return ids.mean()[ids.size() == 2].to_numpy()


def decide(base_ms, head_ms, threshold: float, confidence: float = CONFIDENCE, seed: int = 0, steps=None,
           rounds=None) -> Decision:
    """The head/base ratio of step times with a 95% interval, and the verdict at ``threshold`` (a fraction: 0.05 is
    5%). ``base_ms[i]`` and ``head_ms[i]`` are steps measured next to each other, in the order the sides took turns
    (see ``quartets``). The ratio is exp(median of the quartets' log ratios); its interval a percentile bootstrap
    (``scipy.stats.bootstrap``) that resamples the quartets."""
    q = quartets(base_ms, head_ms, steps, rounds)
    n = 2 * len(q)
    if len(q) < MIN_QUARTETS:
        return Decision(math.nan, math.nan, math.nan, n, "too few steps", math.nan)
    return _decide_logs((q,), np.median, threshold, confidence, seed, n)


def _decide_logs(samples: tuple, stat, threshold: float, confidence: float, seed: int, n: int) -> Decision:
    from scipy.stats import bootstrap

    ci = bootstrap(samples, stat, vectorized=True, confidence_level=confidence, n_resamples=4000,
                   method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return _verdict(float(np.exp(stat(*samples))), float(np.exp(ci.low)), float(np.exp(ci.high)), n, threshold)


def decide_pooled(groups: list[tuple], threshold: float, confidence: float = CONFIDENCE, seed: int = 0) -> Decision:
    """One verdict over several cells of a method (its T values, say): the geometric mean over the cells of their
    ratios (each exp(median of its quartets' log ratios)), with a bootstrap interval that resamples every cell's
    quartets (each cell a sample of its own). A slowdown of a method's code shows in all its cells; pooled, their
    steps find a smaller one than any cell alone. A group is (base_ms, head_ms) or (base_ms, head_ms, steps,
    rounds), as ``decide`` takes them."""
    qs = [quartets(*g) for g in groups]
    qs = [q for q in qs if len(q) >= MIN_QUARTETS]
    n = 2 * sum(len(q) for q in qs)
    if len(qs) < 2:
        return Decision(math.nan, math.nan, math.nan, n, "too few steps", math.nan)

    def mean_of_medians(*xs, axis=-1):
        return np.mean([np.median(x, axis=axis) for x in xs], axis=0)

    return _decide_logs(tuple(qs), mean_of_medians, threshold, confidence, seed, n)


def paired(steps: pd.DataFrame, key: str, base: str, head: str) -> tuple[np.ndarray, ...]:
    """The two sides' step times of one cell, aligned by (round, step): only steps both sides measured; then each
    pair's step index and round (for ``quartets``)."""
    d = steps[steps["key"] == key].pivot_table(index=["round", "step"], columns="side", values="step_ms")
    if base not in d or head not in d:
        return np.array([]), np.array([]), np.array([], int), np.array([], int)
    d = d[[base, head]].dropna()
    return (d[base].to_numpy(), d[head].to_numpy(), d.index.get_level_values("step").to_numpy(),
            d.index.get_level_values("round").to_numpy())


def judge(cmp: Comparison, base: str, head: str, threshold: float) -> pd.DataFrame:
    """One line per cell (scope "cell"): time ratio, interval, verdict, detectable slowdown, and the exact metrics'
    verdicts; then one line per method with two or more cells (scope "method"): their pooled time verdict."""
    out = []
    pairs = {cell.key: paired(cmp.steps, cell.key, base, head) for cell in cmp.cells}
    for cell in cmp.cells:
        b, h, steps, rounds = pairs[cell.key]
        d = decide(b, h, threshold, steps=steps, rounds=rounds)
        line = {"method": cell.method, "T": cell.T, "key": cell.key, "base_ms": float(np.median(b)) if len(b) else None,
                "head_ms": float(np.median(h)) if len(h) else None, "ratio": d.ratio, "low": d.low, "high": d.high,
                "pairs": d.n, "time": d.verdict, "detectable": d.detectable}
        rows = cmp.rows[cmp.rows["key"] == cell.key] if not cmp.rows.empty else cmp.rows
        problems = []
        for side in (base, head):
            bad = rows[(rows["side"] == side) & (rows["status"] != "ok")] if len(rows) else rows
            crashed = [c for c in cmp.crashes if c["key"] == cell.key and c["side"] == side]
            if len(bad):
                problems.append(f"{side}: {bad.iloc[0]['status']}: {str(bad.iloc[0]['error'] or '').splitlines()[0][:160]}")
            elif crashed:  # its worker died in this cell: a failure of that side like any other
                problems.append(f"{side}: {crashed[0]['error'].split(': ', 1)[-1][:160]}")
        line["problem"] = "; ".join(problems) or None
        exact = []
        for m in EXACT_METRICS:
            vb = rows[rows["side"] == base][m].dropna() if len(rows) and m in rows else pd.Series(dtype=float)
            vh = rows[rows["side"] == head][m].dropna() if len(rows) and m in rows else pd.Series(dtype=float)
            if len(vb) and len(vh):
                x, y = float(vb.iloc[0]), float(vh.iloc[0])
                line[f"{m}_base"], line[f"{m}_head"] = x, y
                tol = (METRIC[m].tolerance or 0.0) / 100
                if y > x * (1 + tol) + 1e-12:
                    exact.append(f"{m} {x:g} -> {y:g}")
        line["exact"] = "; ".join(exact) or None
        out.append(line)
    for method in dict.fromkeys(c.method for c in cmp.cells):  # every method with two or more cells, pooled
        mine = [c for c in cmp.cells if c.method == method]
        if len(mine) < 2:
            continue
        d = decide_pooled([pairs[c.key] for c in mine], threshold)
        out.append({"method": method, "T": None, "key": None, "scope": "method", "base_ms": None, "head_ms": None,
                    "ratio": d.ratio, "low": d.low, "high": d.high, "pairs": d.n, "time": d.verdict,
                    "detectable": d.detectable, "problem": None, "exact": None})
    t = pd.DataFrame(out)
    if len(t):
        t["scope"] = t["scope"].fillna("cell") if "scope" in t else "cell"
    return t


def to_confirm(table: pd.DataFrame) -> set[str]:
    """The keys of the cells a "slower" verdict rests on: each slower cell, and every cell of a method slower over
    its cells."""
    if table.empty:
        return set()
    cells = table[table["scope"] == "cell"]
    methods = set(table[(table["scope"] == "method") & (table["time"] == "slower")]["method"])
    return set(cells[(cells["time"] == "slower") | cells["method"].isin(methods)]["key"])


def confirmed(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """``first``'s lines with each "slower" verdict kept only where ``second`` (fresh rounds of those cells, judged
    alone) calls the same line slower; otherwise "not confirmed". The second interval goes beside the first
    (``confirm_*``), and a head failure in the second measurement is a problem of the line like any other."""
    out = first.copy()
    for c in ("confirm_ratio", "confirm_low", "confirm_high"):
        out[c] = math.nan
    out["confirm_pairs"] = 0

    def line_id(r):
        return ("cell", r["key"]) if r["scope"] == "cell" else ("method", r["method"])

    again = {line_id(r): r for _, r in second.iterrows()}
    for i, r in out.iterrows():
        s = again.get(line_id(r))
        if s is None:
            if r["time"] == "slower":
                out.at[i, "time"] = "not confirmed"
            continue
        out.at[i, "confirm_ratio"], out.at[i, "confirm_low"], out.at[i, "confirm_high"] = s["ratio"], s["low"], s["high"]
        out.at[i, "confirm_pairs"] = s["pairs"]
        if r["time"] == "slower" and s["time"] != "slower":
            out.at[i, "time"] = "not confirmed"
        if s.get("problem") and "head: " in s["problem"] and not (r.get("problem") and "head: " in r["problem"]):
            out.at[i, "problem"] = "; ".join(x for x in (r.get("problem"), f"confirmation: {s['problem']}") if x)
        if s.get("exact") and not r.get("exact"):
            out.at[i, "exact"] = s["exact"]
    return out


def verdict_code(table: pd.DataFrame) -> int:
    """1 when any cell is slower, grew in an exact metric, or failed on the head side where the base ran; else 0."""
    if table.empty:
        return 0
    head_failed = table["problem"].fillna("").str.contains("head: ")
    bad = (table["time"] == "slower") | table["exact"].notna() | head_failed
    return 1 if bad.any() else 0


def markdown(table: pd.DataFrame, cmp: Comparison, base: str, head: str, threshold: float,
             confirm: Comparison | None = None) -> str:
    from tabulate import tabulate

    def interval(r, pre=""):
        x = r.get(pre + "ratio", math.nan)
        return "" if x is None or math.isnan(x) else f"{x:.3f} [{r[pre + 'low']:.3f}, {r[pre + 'high']:.3f}]"

    def detectable(r):
        return "" if not np.isfinite(r["detectable"]) else f"{r['detectable'] * 100:.1f}%"

    rounds = int(cmp.rows["round"].max()) + 1 if len(cmp.rows) else 0
    lines = [f"# Speed comparison: {cmp.sides[head]} against {cmp.sides[base]}", "",
             f"{len(cmp.cells)} cell(s), {rounds} round(s), threshold {threshold * 100:g}%, {CONFIDENCE:.0%} intervals; "
             f"measured in {cmp.wall_s:.0f} s."]
    if confirm is not None:
        again = int(confirm.rows["round"].max()) + 1 if len(confirm.rows) else 0
        lines[-1] += (f" A slower verdict was measured again: {len(confirm.cells)} cell(s), {again} fresh round(s), "
                      f"{confirm.wall_s:.0f} s (column 'again'; the verdict stands only if it holds there too).")
    lines.append("")
    shown = confirm is not None
    cells = table[table["scope"] == "cell"] if len(table) else table
    pooled = table[table["scope"] == "method"] if len(table) else table
    rows = [[r["method"], int(r["T"]), "" if pd.isna(r["base_ms"]) else f"{r['base_ms']:.2f}",
             "" if pd.isna(r["head_ms"]) else f"{r['head_ms']:.2f}", interval(r), r["pairs"], r["time"],
             detectable(r)] + ([interval(r, "confirm_")] if shown else []) + [r["exact"] or "", r["problem"] or ""]
            for _, r in cells.iterrows()]
    lines.append(tabulate(rows, headers=["method", "T", "base ms", "head ms", "head/base [95% CI]", "pairs", "time",
                                         "detectable"] + (["again [95% CI]"] if shown else [])
                          + ["exact metrics", "problems"], tablefmt="github"))
    if len(pooled):
        rows = [[r["method"], interval(r), r["pairs"], r["time"], detectable(r)]
                + ([interval(r, "confirm_")] if shown else []) for _, r in pooled.iterrows()]
        lines += ["", "Each method over its cells (geometric mean of their ratios, every cell's quartets resampled):", "",
                  tabulate(rows, headers=["method", "head/base [95% CI]", "pairs", "time", "detectable"]
                           + (["again [95% CI]"] if shown else []), tablefmt="github")]

    def count(t, verdict):
        return int((t["time"] == verdict).sum()) if len(t) else 0

    n_slow, n_fast, n_unconf = count(cells, "slower"), count(cells, "faster"), count(cells, "not confirmed")
    n_exact = int(cells["exact"].notna().sum()) if len(cells) else 0
    lines += ["", f"Summary: {n_slow} cell(s) slower, {n_fast} faster, {n_exact} exact-metric regression(s), "
                  f"{n_unconf} slower at first but not confirmed, {len(cells) - n_slow - n_fast - n_unconf} without a "
                  f"change beyond the threshold; {count(pooled, 'slower')} method(s) slower over their cells"
                  + (f" ({count(pooled, 'not confirmed')} not confirmed)." if count(pooled, "not confirmed") else ".")]
    failures = cmp.failures + ([f"(again) {f}" for f in confirm.failures] if confirm is not None else [])
    if failures:
        lines += ["", "Workers that died:"] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def check_judgeable(cells: list[Cell], rounds: int, confirm_rounds: int) -> None:
    """A UsageError (exit 2) when a cell would run too few steps to be judged: its first measurement (``rounds``)
    or its confirmation (``confirm_rounds``, where on) would hold fewer than MIN_QUARTETS ABBA quartets. Such a
    gate could never fail (every cell "too few steps", or no slower verdict ever confirmed), so it is refused."""
    for what, n_rounds in (("--rounds", rounds), ("--confirm-rounds", confirm_rounds)):
        if not n_rounds:
            continue
        for cell in cells:
            steps = even_steps(cell).steps
            if n_rounds * (steps // 2) < MIN_QUARTETS:
                raise UsageError(
                    f"{cell.label}: {steps} timed step(s) a round x {what} {n_rounds} = "
                    f"{n_rounds * (steps // 2)} ABBA quartet(s), and a cell needs {MIN_QUARTETS} to be judged; "
                    f"raise {what} or the cell's steps (--set steps=N)")


def compare(base_rev: str, head_rev: str | None, cells: list[Cell], rounds: int, threshold_pct: float,
            out: Path | None = None, repo: Path = REPO, progress: Callable[[str], None] | None = None,
            confirm_rounds: int | None = None,
            timeout_s: float | None = None) -> tuple[int, pd.DataFrame, str]:
    """Check out both sides, measure, decide, and measure a slower verdict again (``confirm_rounds``, default
    ``rounds``; 0: no confirmation). A side's worker silent for ``timeout_s`` seconds is killed: that cell and
    round are lost, a failure of that side (None: ``WORKER_TIMEOUT_S``). Returns (exit code, table, markdown)."""
    cells = [c for c in cells if c.kind == "profile"]
    confirm_rounds = rounds if confirm_rounds is None else confirm_rounds
    if not cells:
        raise UsageError("compare runs profile cells, and the grid has none")
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, not {rounds}")
    if confirm_rounds < 0:
        raise UsageError(f"--confirm-rounds must be 0 or more, not {confirm_rounds}")
    if not 0 <= threshold_pct < 100:
        raise UsageError(f"--threshold is a percentage in [0, 100), not {threshold_pct}")
    if timeout_s is not None and not timeout_s > 0:
        raise UsageError(f"--worker-timeout is a number of seconds above 0, not {timeout_s}")
    timeout_s = WORKER_TIMEOUT_S if timeout_s is None else timeout_s
    check_judgeable(cells, rounds, confirm_rounds)
    threshold = threshold_pct / 100
    again = None
    with tempfile.TemporaryDirectory(prefix="snnbench-sides-") as tmp:
        roots = {"base": Path(tmp) / "base", "head": Path(tmp) / "head"}
        labels = {"base": checkout(repo, base_rev, roots["base"], CODE_PATHS),
                  "head": checkout(repo, head_rev, roots["head"], CODE_PATHS)}
        try:
            cmp = measure(roots, labels, cells, rounds, progress, timeout_s=timeout_s)
            table = judge(cmp, "base", "head", threshold)
            cells_only = table[table["scope"] == "cell"]
            base_failed = cells_only["problem"].fillna("").str.contains("base: ")
            if len(cells_only) and base_failed.all():
                raise UsageError(f"the base revision {labels['base']} ran no cell: {table['problem'].iloc[0]}")
            keys = to_confirm(table)
            if keys and confirm_rounds:
                if progress:
                    progress(f"{len(keys)} cell(s) slower: measuring them again, {confirm_rounds} round(s)")
                again = measure(roots, labels, [c for c in cells if c.key in keys], confirm_rounds, progress,
                                timeout_s=timeout_s)
                table = confirmed(table, judge(again, "base", "head", threshold))
        except SideFailed as e:
            raise UsageError(f"cannot run a side of the comparison: {e}") from None
    md = markdown(table, cmp, "base", "head", threshold, again)
    if out is not None:
        steps = cmp.steps.assign(stage="first")
        if again is not None:
            steps = pd.concat([steps, again.steps.assign(stage="again")], ignore_index=True)
        atomic_write_parquet(steps, out / "steps.parquet")
        atomic_write_parquet(table, out / "comparison.parquet")
        write_atomic(out / "compare.md", lambda f: f.write(md.encode()))
    return verdict_code(table), table, md
