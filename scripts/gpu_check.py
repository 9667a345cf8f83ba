"""Every GPU fact snnbench needs, in one call that fits a short slot on a GPU machine (scripts/gpu-check.sh).

    bash scripts/gpu-check.sh OUT [--device DEV] [--quick] [--parts P1,P2]

Runs the parts below in this order (the most telling first), each under its own time limit: a part that overruns
is stopped, said so in the summary, and the next part runs. Leaves two files under OUT: ``summary.md`` (every
part's verdict and figures) and ``results.tgz`` (each part's results folder and log). ``--device cpu --quick``
runs the same plumbing on a CPU at toy sizes in a few minutes (a test does); without ``--device`` it is cuda where
there is one.

- gpu-tests: ``pytest -m gpu`` (the fused kernels compiled, a whole step on every backend, cells on the GPU, CUDA
  started in the fork server's children);
- gate: ``grids/ci_gpu.toml`` (``ci_cpu`` on a CPU), checked against ``baselines/gpu-<slug>.parquet`` where one is
  committed (step time left to ``compare``), and the invariants;
- train: a short train grid on the digits, every method once, on the triton backend and in bf16 where the
  method allows them (``Method.torch_only``, ``Method.bf16``): loaders, evaluation, the analyses, checkpoints;
- resume: one train cell stopped by SIGTERM in the middle of an epoch and run again, against the same cell run
  without a stop: equal on a CPU, within the stated tolerance on a GPU (its kernels are not bitwise repeatable);
- aa: an A/A ``compare`` of two cells (this tree against itself): the speed gate's noise on this device;
- paper_cost: the paper's training-cost cells at T = 1, 2, 4, 8;
- backends: ``benchmarks/backends.py neuron`` and ``step``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# seconds per part: (on a GPU, full size; --quick). The full limits add up to 8.3 minutes, an H100/H200 slot's share.
LIMITS = {"gpu-tests": (60, 120), "gate": (170, 90), "train": (100, 180), "resume": (40, 60), "aa": (60, 120),
          "paper_cost": (40, 60), "backends": (30, 60)}
PARTS = tuple(LIMITS)
RESUME_TOL = {"cpu": 0.0, "cuda": 1e-3}  # relative difference of each epoch's training loss, resumed vs not


@dataclass
class Part:
    name: str
    limit_s: float
    status: str = "not run"  # ok | FAILED | overran | skipped
    wall_s: float = 0.0
    lines: list[str] = field(default_factory=list)  # its figures and verdicts, markdown


class Check:
    def __init__(self, out: Path, device: str, quick: bool) -> None:
        self.out, self.device, self.quick = out, device, quick
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
        if device == "cpu":
            self.env["TRITON_INTERPRET"] = "1"  # Triton on CPU tensors: its interpreter
        self.deadline = 0.0
        self.log = None
        # the device's peak memory column: the allocator's on a GPU, the process's RSS on a CPU
        self.peak_column = "peak_alloc_mib" if device.startswith("cuda") else "peak_rss_mib"
        self.ci_grid = "ci_gpu" if device.startswith("cuda") else "ci_cpu"  # the gate's grid on this device

    # ------------------------------------------------------------------ running commands within a part's limit

    def sh(self, *cmd) -> tuple[int, str]:
        """Run a command (its output into the part's log) until the part's deadline; (exit code, stdout+stderr).
        Past the deadline it is stopped (SIGTERM, then SIGKILL) and ``Overran`` raised."""
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise Overran()
        self.log.write(f"\n$ {shlex.join(map(str, cmd))}\n")
        self.log.flush()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env=self.env, start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            _stop(proc)
            text = proc.communicate()[0]
            self.log.write(text + "\n[stopped: the part's time limit]\n")
            raise Overran() from None
        self.log.write(text)
        return proc.returncode, text

    def run_bench(self, *args) -> tuple[int, str]:
        return self.sh(sys.executable, REPO / "run_bench.py", *args)

    # ------------------------------------------------------------------ the parts

    def gpu_tests(self, p: Part) -> None:
        files = ["tests/test_backends.py", "tests/test_gpu.py", "tests/test_forkserver.py"]
        rc, text = self.sh(sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files)
        last = [ln for ln in text.strip().splitlines() if "passed" in ln or "skipped" in ln or "failed" in ln
                or "deselected" in ln][-1:]
        p.lines.append(f"`pytest -m gpu {' '.join(files)}`: {last[0] if last else text.strip()[-200:]}")
        if self.device == "cpu":
            p.lines.append("(no CUDA here: every gpu test is skipped by design)")
        p.status = "ok" if rc in (0, 5) else "FAILED"

    def gate(self, p: Part) -> None:
        grid = self.ci_grid
        res = self.work / grid
        args = ["run", grid, "--device", self.device, "--out", res]
        if self.quick:  # the gate's plumbing only: two methods at two T
            args += ["--filter", "method=bptt_m,rate_m", "--filter", "T=1,8", "--set", "steps=4"]
        rc, text = self.run_bench(*args)
        p.lines.append(f"`run {grid}`: exit {rc}; " + _cells_line(res))
        slug = self.sh(sys.executable, "-m", "bench.env", "--device-slug")[1].strip().splitlines()[-1]
        baseline = REPO / "baselines" / ("cpu.parquet" if slug == "cpu" else f"gpu-{slug}.parquet")
        check = ["check", "--invariants", res, "--report", res / "gate.md"]
        if baseline.is_file() and not self.quick:
            check += ["--baseline", baseline, "--results", res, "--tolerance", "step_time_ms_median=off"]
            if slug == "cpu":
                check += ["--tolerance", "peak_rss_mib=off"]
        else:
            p.lines.append(f"baseline: {'none for ' + slug if not baseline.is_file() else 'not compared (--quick)'}")
        crc, text = self.run_bench(*check)
        p.lines += _gate_lines(text)
        p.status = "ok" if rc == 0 and crc == 0 else "FAILED"

    def train(self, p: Part) -> None:
        res = self.work / "train"
        grid = self.work / "gpu_check_train.toml"
        grid.write_text(train_grid(self.quick))
        # planned first (bench/plan.py: a probe per configuration on this device), then run: the plan's errors
        prc, _ = self.run_bench("plan", grid, "--device", self.device, "--out", res)
        rc, _ = self.run_bench("run", grid, "--device", self.device, "--out", res)
        from reports.aggregate import plan_error_summary, plan_vs_measured
        from reports.results import load_results, read_plan

        df = load_results(res)
        cmp = plan_vs_measured(read_plan(res), df)
        if cmp is not None:
            s = plan_error_summary(cmp)
            said = ", ".join(f"{k} {s[k][0]:.1f}% / {s[k][1]:.1f}%" for k in ("wall_s", "step_ms", "saved_mib", "memory")
                             if s[k][0] is not None)
            p.lines.append(f"`plan gpu_check_train` (exit {prc}, {float(read_plan(res)['plan_s'].iloc[0]):.1f} s) against "
                           f"the run, {s['cells']} cell(s), |error| median / largest: {said}")
        else:
            p.lines.append(f"`plan gpu_check_train`: exit {prc}, no cell both planned and measured")
        mem = self.peak_column
        p.lines.append(f"`run gpu_check_train`: exit {rc}; " + _cells_line(res))
        p.lines.append("")
        p.lines.append(f"| method | backend | precision | status | acc % | epoch s | {mem} | saved MiB |")
        p.lines.append("|---|---|---|---|---|---|---|---|")
        for r in df.sort_values("method").to_dict("records"):
            p.lines.append(f"| {r['method']} | {r.get('backend')} | {r.get('precision')} | {r['status']} | "
                           f"{_f(r.get('acc_top1'))} | {_f(r.get('epoch_time_s'), 3)} | {_f(r.get(mem))} | "
                           f"{_f(r.get('saved_for_backward_mib'), 3)} |")
        p.status = "ok" if rc == 0 else "FAILED"

    def resume(self, p: Part) -> None:
        from bench.cell import Cell
        from reports.results import load_results

        size = dict(train_subset=512, batch_size=16) if self.quick else dict(train_subset=0, batch_size=8)
        cell = Cell("bptt_m", "cnn_digits", "digits", 4, epochs=2, warmup_steps=1, device=self.device,
                    grid="gpu_check_resume", **size)
        whole, stopped = self.work / "resume-whole", self.work / "resume-stopped"
        st0, _ = self.worker(cell, whole)
        st1, at = self.worker(cell, stopped, stop_in_epoch=2)
        st2, _ = self.worker(cell, stopped)
        rows = {k: load_results(d).set_index("key").loc[cell.key] for k, d in (("whole", whole), ("stopped", stopped))}
        ep = {k: load_results(d, "epochs").sort_values("epoch") for k, d in (("whole", whole), ("stopped", stopped))}
        loss_w, loss_s = ep["whole"]["train_loss"].to_numpy(), ep["stopped"]["train_loss"].to_numpy()
        rel = float(max(abs(a - b) / abs(a) for a, b in zip(loss_w, loss_s))) if len(loss_w) == len(loss_s) else None
        tol = RESUME_TOL["cuda" if self.device.startswith("cuda") else "cpu"]
        p.lines.append(f"SIGTERM {at or 'never sent (the cell ended first)'}: the cell ended {st1}; run again, "
                       f"{st2}")
        p.lines.append(f"resumed: status {rows['stopped']['status']}, restarts {int(rows['stopped']['restarts'])}; "
                       f"uninterrupted: status {rows['whole']['status']}")
        p.lines.append(f"per-epoch training loss, uninterrupted {list(map(_f6, loss_w))} vs resumed "
                       f"{list(map(_f6, loss_s))}: largest relative difference {rel if rel is None else f'{rel:.2e}'}"
                       f" (tolerance {tol:g}); accuracy {_f(rows['whole']['acc_top1'])} vs "
                       f"{_f(rows['stopped']['acc_top1'])}")
        ok = (st0 == st2 == "ok" and st1 == "preempted" and at is not None and rows["stopped"]["status"] == "ok"
              and int(rows["stopped"]["restarts"]) == 1 and rel is not None and rel <= tol)
        p.status = "ok" if ok else "FAILED"

    def worker(self, cell, out: Path, stop_in_epoch: int | None = None) -> tuple[str, str | None]:
        """Run ``cell`` in a fresh worker as the launcher does (bench.spawn.run_in_subprocess); with
        ``stop_in_epoch``, send SIGTERM once its progress is past the first step of that epoch. (its status, where
        it was stopped). A worker still running at the part's deadline is killed and ``Overran`` raised."""
        import threading

        from bench.spawn import run_in_subprocess

        box: dict = {}
        at: list[str] = []

        def progress(msg: dict) -> None:
            if stop_in_epoch and not at and msg.get("epoch") == stop_in_epoch and msg.get("step"):
                at.append(f"at step {msg['step']} of {msg['steps']} (epoch {msg['epoch']})")
                box["proc"].send_signal(signal.SIGTERM)

        timer = threading.Timer(max(1.0, self.deadline - time.monotonic()), lambda: box["proc"].kill())
        timer.start()
        try:
            status, _ = run_in_subprocess(cell, out, None, progress, on_start=lambda proc: box.update(proc=proc),
                                          stopping=lambda: bool(at))
        finally:
            timer.cancel()
        if time.monotonic() >= self.deadline:
            raise Overran()
        return status, at[0] if at else None

    def aa(self, p: Part) -> None:
        if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
            # a copy of the tree without its history (a device machine): a commit of it, so HEAD exists
            for c in (["git", "init", "-q"], ["git", "add", "-A"],
                      ["git", "-c", "user.name=gpu-check", "-c", "user.email=gpu-check@localhost", "commit", "-qm",
                       "gpu-check: this tree"]):
                subprocess.run(c, cwd=REPO, capture_output=True)
            p.lines.append("(no git history here: the tree was committed to a new repository for the comparison)")
        grid = self.ci_grid
        out = self.work / "compare-aa"
        args = ["compare", "HEAD", "--grid", grid, "--device", self.device, "--filter", "method=bptt_m,rate_m",
                "--filter", f"T={1 if self.quick else 8}", "--rounds", "3", "--out", out, "--report", out / "compare.md"]
        if self.quick:
            args += ["--set", "steps=6", "--confirm-rounds", "0"]
        rc, text = self.run_bench(*args)
        p.lines += [ln for ln in text.splitlines() if any(k in ln for k in ("bptt_m", "rate_m", "verdict", "detect"))][:12]
        p.status = "ok" if rc == 0 else "FAILED"

    def paper_cost(self, p: Part) -> None:
        res = self.work / "paper_cost"
        args = ["run", "paper_cost", "--device", self.device, "--out", res, "--filter", "T=1,2,4,8"]
        if self.quick:  # two T at toy size
            args[-1] = "T=1,2"
            args += ["--set", "batch_size=4", "--set", "steps=3", "--set", "warmup_steps=1"]
        rc, _ = self.run_bench(*args)
        from reports.results import load_results

        df = load_results(res)
        mem = self.peak_column
        p.lines.append(f"`run paper_cost`: exit {rc}; " + _cells_line(res))
        p.lines += ["", f"| method | T | step ms | {mem} | peak_nvml_mib | saved MiB | J per step |",
                    "|---|---|---|---|---|---|---|"]
        for r in df.sort_values(["method", "T"]).to_dict("records"):
            p.lines.append(f"| {r['method']} | {r['T']} | {_f(r.get('step_time_ms_median'))} | {_f(r.get(mem))} | "
                           f"{_f(r.get('peak_nvml_mib'))} | {_f(r.get('saved_for_backward_mib'))} | "
                           f"{_f(r.get('energy_per_step_j'))} |")
        p.status = "ok" if rc == 0 else "FAILED"

    def backends(self, p: Part) -> None:
        script = REPO / "benchmarks" / "backends.py"
        if self.quick:
            neuron = ["--T", "2,4", "--batch", "2", "--channels", "4", "--size", "4", "--rounds", "2", "--warmup", "1"]
            step = ["--arch", "cnn_digits", "--batch", "8", "--T", "2", "--methods", "bptt_m,rate_m", "--rounds", "2",
                    "--warmup", "1", "--backends", "torch,triton"]
        else:
            neuron = ["--rounds", "10", "--warmup", "3"]
            step = ["--T", "4", "--methods", "bptt_m,rate_m", "--rounds", "3", "--warmup", "1"]
        rc1, t1 = self.sh(sys.executable, script, "neuron", "--device", self.device, *neuron)
        p.lines += ["```", *t1.strip().splitlines()[-12:], "```"]
        rc2, t2 = self.sh(sys.executable, script, "step", "--device", self.device, *step)
        p.lines += ["```", *t2.strip().splitlines()[-12:], "```"]
        p.status = "ok" if rc1 == rc2 == 0 else "FAILED"

    # ------------------------------------------------------------------ the whole

    def run(self, names: list[str]) -> list[Part]:
        parts = []
        for name in names:
            p = Part(name, LIMITS[name][1 if self.quick else 0])
            parts.append(p)
            self.deadline = time.monotonic() + p.limit_s
            t0 = time.monotonic()
            with open(self.work / f"{name}.log", "w") as self.log:
                try:
                    getattr(self, name.replace("-", "_"))(p)
                except Overran:
                    p.status = "overran"
                    p.lines.append(f"stopped at its limit of {p.limit_s:g} s; what it had measured is in results.tgz")
                except Exception as e:  # a part's own failure: said, and the next part runs
                    p.status = "FAILED"
                    p.lines.append(f"{type(e).__name__}: {e}")
                    self.log.write(f"\n{type(e).__name__}: {e}\n")
            p.wall_s = time.monotonic() - t0
            print(f"gpu-check: {name}: {p.status} in {p.wall_s:.0f} s", file=sys.stderr, flush=True)
        return parts

    def write(self, parts: list[Part], started: float) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        head = [f"# gpu-check: {self.device}{' (--quick)' if self.quick else ''}", "", _device_line(self.env), "",
                "| part | verdict | seconds | limit |", "|---|---|---|---|"]
        head += [f"| {p.name} | {p.status} | {p.wall_s:.0f} | {p.limit_s:g} |" for p in parts]
        head += ["", f"total {time.monotonic() - started:.0f} s", ""]
        body = []
        for p in parts:
            body += [f"## {p.name}: {p.status}", "", *p.lines, ""]
        (self.out / "summary.md").write_text("\n".join(head + body) + "\n")
        with tarfile.open(self.out / "results.tgz", "w:gz") as tar:
            tar.add(self.work, arcname="gpu-check")
        shutil.rmtree(self.work, ignore_errors=True)


class Overran(Exception):
    """A part reached its time limit."""


def _stop(proc: subprocess.Popen) -> None:
    """The process and its children (its own session): SIGTERM, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def train_grid(quick: bool) -> str:
    """Every method once on the digits: on the triton backend where the method's neurons allow it, in bf16 where the
    method allows it (read from the Method classes, so a new method is in without an edit), on an architecture it
    supports (cnn_digits, else its first)."""
    from methods import METHODS

    names = sorted(METHODS)
    lines = ['name = "gpu_check_train"', "[axes]", f"method = {json.dumps(names)}", 'arch = ["cnn_digits"]',
             'dataset = ["digits"]', "T = [2]", "[fixed]", 'kind = "train"', "epochs = 1", "warmup_steps = 1",
             f"batch_size = {32 if quick else 64}", f"train_subset = {64 if quick else 512}"]
    for name in names:
        cls = METHODS[name]
        sets = {"backend": "triton" if cls.torch_only is None else "torch",
                "precision": "bf16" if cls.bf16 is None else "fp32"}
        m = cls(T=2)
        if not m.supports("cnn_digits"):
            sets["arch"] = _arch_for_digits(m)
        body = ", ".join(f"{k} = {json.dumps(v)}" for k, v in sets.items())
        lines += ["[[override]]", f'match = {{ method = "{name}" }}', f"set = {{ {body} }}"]
    return "\n".join(lines) + "\n"


def _arch_for_digits(method) -> str:
    """The first architecture the method supports that builds for the digits' 1x8x8 input."""
    for arch in method.supported_archs():
        try:
            method.build(arch, 10, 1, input_shape=(1, 8, 8))
            return arch
        except ValueError:
            continue
    raise ValueError(f"{method.name} supports no architecture that takes the digits")


def _f(v, digits: int = 1) -> str:
    try:
        return "-" if v is None or v != v else f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)


def _f6(v) -> str:
    return f"{float(v):.6g}"


def _cells_line(res: Path) -> str:
    from reports.results import load_results

    df = load_results(res)
    if df.empty:
        return "no cell stored"
    counts = df["status"].value_counts().to_dict()
    return f"{len(df)} cell(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _gate_lines(text: str) -> list[str]:
    keep = ("matched cells", "invariant", "gate ", "step-time growth", "saved_for_backward", "REGRESSION", "FAIL")
    return ["```", *[ln for ln in text.splitlines() if any(k in ln for k in keep)][:30], "```"]


def _device_line(env: dict) -> str:
    code = ("import torch, platform; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "
            "platform.processor() or platform.machine(); print(f'{d}; torch {torch.__version__}')")
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "device: unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="where summary.md and results.tgz go")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda where there is one)")
    p.add_argument("--quick", action="store_true", help="toy sizes: the plumbing, in a few minutes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which parts, in order (default: {','.join(PARTS)})")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    bad = [x for x in parts if x not in LIMITS]
    if bad:
        print(f"error: unknown part(s) {', '.join(bad)}; valid: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if a.out.exists() and not a.out.is_dir():
        print(f"error: OUT {str(a.out)!r} is a file, not a folder", file=sys.stderr)
        return 2
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {device}: no CUDA device here (use --device cpu)", file=sys.stderr)
        return 2
    if device != "cpu" and not device.startswith("cuda"):
        print(f"error: --device must be cpu, cuda or cuda:N, got {device!r}", file=sys.stderr)
        return 2
    started = time.monotonic()
    check = Check(a.out, device, a.quick)
    done = check.run(parts)
    check.write(done, started)
    print(f"gpu-check: {a.out / 'summary.md'}, {a.out / 'results.tgz'}", file=sys.stderr)
    return 0 if all(p.status == "ok" for p in done) else 1


if __name__ == "__main__":
    sys.exit(main())
