"""snnbench command line: parses, then calls bench/ or reports/.

    python run_bench.py                       # the default grid on this machine, then its report
    python run_bench.py report DIR            # figures, tables, summary.md, index.html
    python run_bench.py run GRID [--filter method=rate_m,bptt_m --filter T=1,2,4] [--set epochs=3]
                                 [--data-root DIR] [--out DIR] [--gpus all|0,1 | --jobs N]
                                 [--in-process | --slurm [--detach]]
    python run_bench.py plan GRID [--filter ...] [--set ...] [--device DEV] [--out DIR] [--memory-mib M]
                                              # predicted time, memory and energy of every cell, before it runs
    python run_bench.py list                  # methods, architectures, datasets, grids
    python run_bench.py check --baseline B --results R [--tolerance METRIC=PCT] [--invariants R] [--report FILE]
    python run_bench.py baseline R OUT.parquet  # record R's cells as a baseline, on purpose
    python run_bench.py status DIR            # ok / stale / failed / missing / running cells of a results folder

Errors a user can cause end with one message and exit code 2. ``run`` exits 1 when a cell failed, 75 when cells
were preempted or left by a stop signal (the same command again resumes them), 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, exit 2 (argparse's own convention)
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: cells were preempted or left; the same command again continues them


def cmd_run(a) -> int:
    from bench.launch import prepare_run, run_grid

    # main() started the workers' fork server before it built the parser, where the words say this is a run in
    # fresh workers; run_grid starts one itself where none was given
    server = getattr(a, "fork_server", None)
    name, cells, out, spec = prepare_run(a.grid, a.filter, a.set, a.device, a.data_root, a.out)
    launcher = "inprocess" if a.in_process else ("slurm" if a.slurm else "subprocess")
    slurm = None
    if a.slurm:
        from bench.slurm import AUTO, SlurmSettings, parse_slurm_sets

        sets = parse_slurm_sets(a.slurm_set)
        for flag, key in (("slurm_partition", "partition"), ("slurm_timeout_min", "timeout_min"),
                          ("slurm_gpus", "gpus_per_node")):
            if getattr(a, flag, None) is not None:
                sets[key] = getattr(a, flag)
        slurm = SlurmSettings.make(spec.get("slurm"), sets, cells)
        if AUTO in (slurm.timeout_min, slurm.cells_per_task):  # sized from the folder's plan: checked before all
            from bench.plan import predicted_seconds

            slurm.predicted = predicted_seconds(out, cells)
    elif a.detach or a.slurm_set:
        from bench.errors import UsageError

        raise UsageError("--detach and --slurm-set go with --slurm")
    slots = None
    if a.gpus or a.jobs:
        from bench.errors import UsageError
        from bench.launch import cpu_slots, gpu_slots

        if a.gpus and a.jobs:
            raise UsageError("--gpus and --jobs: one or the other (GPU cells go one per GPU, CPU cells N at a time)")
        if a.gpus:
            import torch

            slots = gpu_slots(a.gpus, torch.cuda.device_count())
        else:
            slots = cpu_slots(a.jobs)
    from bench.launch import check_slots

    check_slots(cells, slots or [], a.share_cpu, launcher)
    print(f"grid {name}: {len(cells)} cell(s) -> {out}", file=sys.stderr)
    outcome = run_grid(cells, out, a.data_root, launcher, slurm, reuse_stale=a.reuse_stale, detach=a.detach,
                       poll_s=a.poll_s, slots=slots, server=server)
    if a.slurm and a.detach:
        return 0
    if not getattr(a, "quiet_summary", False):
        summarize(out)
    if outcome.failed:
        print(f"\n{len(outcome.failed)} cell(s) failed:", file=sys.stderr)
        for cell, status, err in outcome.failed:
            first = (err or "").strip().splitlines()[0] if err else ""
            print(f"  [{status}] {cell.label}: {first}", file=sys.stderr)
    if outcome.preempted or outcome.not_started:
        print(f"\n{len(outcome.preempted)} cell(s) preempted or cancelled (checkpointed), {len(outcome.not_started)} "
              "not started" + (f" (stopped by {outcome.stopped_by})" if outcome.stopped_by else "")
              + ": run the same command again to continue them", file=sys.stderr)
        for cell, status, err in outcome.preempted:
            print(f"  [{status}] {cell.label}: {(err or '').strip().splitlines()[0] if err else ''}", file=sys.stderr)
    if outcome.failed:
        return 1
    return PREEMPTED_EXIT if outcome.preempted or outcome.not_started else 0


def summarize(out: Path) -> None:
    """A table of the stored results: identity, status and the metrics the metric table marks for the summary."""
    from tabulate import tabulate

    from reports.results import METRICS, load_results

    df = load_results(out)
    if df.empty:
        print("no results stored", file=sys.stderr)
        return
    several = "kind" in df and df["kind"].nunique() > 1  # fidelity cells beside train cells, say
    ident = ["method", "arch", "dataset", "T", "seed"] + (["kind"] if several else []) + ["status"]
    cols = ident + [m.name for m in METRICS if m.summary and m.name in df and df[m.name].notna().any()]
    view = df[cols].sort_values(["method", "arch", "dataset", "T", "seed"] + (["kind"] if several else []))
    print(tabulate(view, headers="keys", tablefmt="github", showindex=False, floatfmt=".2f", missingval="-"))


def cmd_plan(a) -> int:
    from bench.launch import prepare_run
    from bench.plan import make_plan, render_plan

    name, cells, out, spec = prepare_run(a.grid, a.filter, a.set, a.device, a.data_root, a.out, need_data=False)
    if a.memory_mib is not None and a.memory_mib <= 0:
        from bench.errors import UsageError

        raise UsageError(f"--memory-mib must be > 0, got {a.memory_mib}")
    print(f"grid {name}: planning {len(cells)} cell(s) -> {out / 'plan.parquet'}", file=sys.stderr)
    df = make_plan(cells, out, spec, a.memory_mib, server=getattr(a, "fork_server", None), every_line=a.memory_line)
    print(render_plan(df, a.top))
    return 0


def cmd_status(a) -> int:
    from bench.status import cell_states, format_states

    states = cell_states(_results_dir(a.dir))
    print(format_states(states))
    return 0


def _results_dir(d) -> Path:
    from bench.errors import UsageError

    d = Path(d)
    if not (d / "cells").is_dir() and not (d / "manifest.json").is_file():
        raise UsageError(f"{d} is not a results folder (it has no cells/ folder); results are under results/<grid>/")
    return d


def cmd_report(a) -> int:
    from bench.errors import UsageError
    from reports import render_report

    d = _results_dir(a.dir)
    if a.out and Path(a.out).exists() and not Path(a.out).is_dir():
        raise UsageError(f"--out {a.out!r} is a file, not a folder")
    try:
        r = render_report(d, a.out, history=getattr(a, "history", None))
    except OSError as e:
        raise UsageError(f"cannot write the report: {e}") from None
    print(Path(r["summary"]).read_text())
    print(f"report: {r['index']}", file=sys.stderr)
    return 0


def cmd_list(a) -> int:
    from bench.data import dataset_names
    from bench.grid import load_grid, list_grids
    from methods import ARCHS, METHODS, PRESETS

    print("methods:       " + ", ".join(sorted(METHODS)))
    print("architectures: " + ", ".join(sorted(ARCHS)))
    print("datasets:      " + ", ".join(dataset_names()))
    print("neuron presets:" + " " + ", ".join(sorted(PRESETS)))
    print("grids:")
    for g in list_grids():
        _, spec = load_grid(g)
        print(f"  {g:16s} {spec.get('description', '')}")
    return 0


def cmd_check(a) -> int:
    from bench.check import run_gate

    failed, text = run_gate(a.baseline, a.results, a.tolerance, a.invariants, a.max_growth_ratio, a.flat_tol, a.report)
    print(text)
    return 1 if failed else 0


def cmd_compare(a) -> int:
    from bench.compare import compare
    from bench.launch import prepare_run

    _, cells, out, _ = prepare_run(a.grid, a.filter, a.set, a.device, None, a.out or str(REPO / "results" / "compare"))
    rc, _, md = compare(a.base, a.head, cells, a.rounds, a.threshold, out,
                        progress=lambda s: print(s, file=sys.stderr, flush=True) if a.verbose else None,
                        confirm_rounds=a.confirm_rounds, timeout_s=a.worker_timeout)
    print(md)
    if a.report:
        Path(a.report).write_text(md)
    return rc


def cmd_history(a) -> int:
    from bench.errors import UsageError
    from reports.history import add_run, render_history

    hist = Path(a.dir)
    try:
        if a.add:
            if not a.commit:
                raise UsageError("--add needs --commit SHA (the commit the results were measured at)")
            if not Path(a.add).is_dir():
                raise UsageError(f"--add {a.add}: no such results folder")
            print(f"added {add_run(hist, Path(a.add), a.commit, a.date)}", file=sys.stderr)
        page = render_history(hist)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"history: {page}")
    return 0


def cmd_baseline(a) -> int:
    from bench.check import write_baseline

    n = write_baseline(a.results, a.out)
    print(f"baseline {a.out}: {n} cell(s) from {a.results}")
    return 0


def cmd_default(a) -> int:
    from bench.slurm import POLL_S

    a.grid, a.filter, a.set, a.out, a.data_root, a.in_process, a.slurm, a.device = "default", [], [], None, None, False, False, None
    a.reuse_stale, a.detach, a.slurm_set, a.poll_s = False, False, [], POLL_S
    a.gpus, a.jobs, a.share_cpu = None, None, False
    a.quiet_summary = True
    rc = cmd_run(a)
    a.dir, a.out = REPO / "results" / "default", None
    cmd_report(a)
    return rc


def build_parser() -> argparse.ArgumentParser:
    # the defaults live where they are used (torch-free modules: the parser imports no torch)
    from bench.check import FLAT_TOL_PCT, MAX_GROWTH_RATIO
    from bench.compare import DEFAULT_THRESHOLD_PCT
    from bench.slurm import POLL_S
    from reports.results import METRICS

    p = _Parser(prog="run_bench.py", description="Benchmark SNN training methods.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)
    r = sub.add_parser("run", help="run a grid (a name in grids/ or a TOML path)")
    _cells_arguments(r, data_root="folder that holds the datasets", out="results folder (default results/<grid>)")
    r.add_argument("--reuse-stale", action="store_true",
                   help="keep cells stored ok by other code (stale) instead of rerunning them; report and check mark them")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--in-process", action="store_true", help="run cells in this process (no fresh worker per cell)")
    g.add_argument("--slurm", action="store_true",
                   help="submit cells as a Slurm job array (needs the slurm extra); see the grid's [slurm] table")
    r.add_argument("--slurm-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the grid's [slurm] table (partition, gpus_per_node, cpus_per_task, "
                        "mem_gb, timeout_min, array_parallelism, cells_per_task, signal_delay_s, max_requeues, "
                        "additional)")
    r.add_argument("--slurm-partition", help="= --slurm-set partition=P")
    r.add_argument("--slurm-timeout-min", type=int, help="= --slurm-set timeout_min=M")
    r.add_argument("--slurm-gpus", type=int, help="= --slurm-set gpus_per_node=N")
    r.add_argument("--gpus", metavar="LIST", help="run cells side by side, one per GPU: 'all' or indices like 0,1,3 "
                                               "(each worker sees only its GPU; cells ask for device cuda)")
    r.add_argument("--jobs", type=int, metavar="N", help="run N CPU cells side by side (train cells; profile cells "
                                                         "only with --share-cpu)")
    r.add_argument("--share-cpu", action="store_true", help="with --jobs: let profile cells share the CPU anyway")
    r.add_argument("--detach", action="store_true",
                   help="with --slurm: return once the jobs are submitted (`status DIR` follows them)")
    r.add_argument("--poll-s", type=float, default=POLL_S,
                   help=f"with --slurm: how often to look at the queue, in seconds (default {POLL_S:g})")
    pl = sub.add_parser("plan", help="predict a grid's time, memory and energy from short probes, before it runs")
    _cells_arguments(pl, data_root="accepted as run's; a plan reads no dataset file (sizes come from the registry)",
                     out="results folder: its cells stored ok count as measured; plan.parquet goes there "
                         "(default results/<grid>)")
    pl.add_argument("--memory-mib", type=float, metavar="MIB", help="the memory a cell may use (default: the GPU's; "
                    "on a CPU this machine's, the cgroup's or the grid's [slurm] mem_gb, whichever is least)")
    pl.add_argument("--memory-line", action="store_true", help="fit every cell's peak memory as a line in the batch "
                    "size (a second probe at half the batch); by default only for cells that do not fit")
    pl.add_argument("--top", type=int, default=30, metavar="N", help="rows of the printed table (0: all)")
    rp = sub.add_parser("report", help="figures, tables, summary.md and index.html of a results folder")
    rp.add_argument("dir")
    rp.add_argument("--out", help="report folder (default DIR/report)")
    rp.add_argument("--history", metavar="HDIR", help="link the history page of HDIR (run_bench.py history) from index.html")
    sub.add_parser("list", help="methods, architectures, datasets and grids")
    c = sub.add_parser("check", help="the regression gate: results against a baseline, and invariants")
    c.add_argument("--baseline", help="baseline: a parquet file (see `baseline`) or a results folder")
    c.add_argument("--results", help="results folder to check")
    c.add_argument("--tolerance", action="append", default=[], metavar="[METHOD:]METRIC=PCT",
                   help="tolerance in percent, or 'off' (defaults: "
                        + ", ".join(f"{m.name} {m.tolerance:g}" for m in METRICS if m.tolerance is not None) + ")")
    c.add_argument("--invariants", metavar="R", help="check the machine-independent invariants on results R")
    c.add_argument("--max-growth-ratio", "--max-time-ratio", type=float, default=MAX_GROWTH_RATIO,
                   help="invariant: how fast a method's step time grows with T (slope over the T both ran), at most "
                        f"this x its stated reference's (rate_m: bptt_m; default {MAX_GROWTH_RATIO:g}; "
                        "--max-time-ratio is its former name)")
    c.add_argument("--flat-tol", type=float, default=FLAT_TOL_PCT,
                   help=f"invariant: flat in T within this percent (default {FLAT_TOL_PCT:g})")
    c.add_argument("--report", metavar="FILE", help="write the comparison as markdown")
    cp = sub.add_parser("compare", help="the speed gate: two git revisions measured side by side on this machine")
    cp.add_argument("base", help="the base revision (a commit, tag or branch)")
    cp.add_argument("head", nargs="?", help="the head revision (default: the working tree, uncommitted edits included)")
    cp.add_argument("--grid", required=True, help="a grid of profile cells (a name in grids/ or a TOML path)")
    cp.add_argument("--filter", action="append", default=[], metavar="FIELD=V1,V2", help="keep cells whose FIELD is one of the values")
    cp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field of every cell")
    cp.add_argument("--device", help="cpu, cuda, cuda:N, or auto (default: the grid's, else auto)")
    cp.add_argument("--rounds", type=int, default=3, help="fresh worker pairs per cell (default 3)")
    cp.add_argument("--confirm-rounds", type=int, metavar="N",
                    help="measure the cells of a slower verdict again for N fresh rounds; the verdict stands only if "
                         "they give it too (default: --rounds; 0: no confirmation)")
    cp.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD_PCT, metavar="PCT",
                    help="a slowdown counts when the interval's lower end is above 1 + PCT/100 "
                         f"(default {DEFAULT_THRESHOLD_PCT:g})")
    cp.add_argument("--worker-timeout", type=float, metavar="S",
                    help="kill a side's worker that sends nothing for S seconds (a hang): that cell and round count as "
                         "a failure of that side (default 600)")
    cp.add_argument("--out", help="folder for steps.parquet, comparison.parquet and compare.md (default results/compare)")
    cp.add_argument("--report", metavar="FILE", help="write the comparison as markdown")
    hp = sub.add_parser("history", help="step time and memory per method over commits (a page of plots)")
    hp.add_argument("dir", help="the history folder (runs/ and history.html)")
    hp.add_argument("--add", metavar="RESULTS", help="first append this results folder's ok cells as one run")
    hp.add_argument("--commit", help="the commit RESULTS was measured at (with --add)")
    hp.add_argument("--date", help="its date (default: now, UTC)")
    b = sub.add_parser("baseline", help="record a results folder's ok cells as one baseline parquet file")
    b.add_argument("results")
    b.add_argument("out")
    st = sub.add_parser("status", help="ok / stale / failed / missing / running cells of a results folder")
    st.add_argument("dir")
    return p


def _cells_arguments(p: argparse.ArgumentParser, data_root: str, out: str) -> None:
    """The arguments that pick a grid's cells and where they go (run and plan)."""
    p.add_argument("grid")
    p.add_argument("--filter", action="append", default=[], metavar="FIELD=V1,V2", help="keep cells whose FIELD is one of the values")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field of every cell")
    p.add_argument("--data-root", help=data_root)
    p.add_argument("--out", help=out)
    p.add_argument("--device", help="cpu, cuda, cuda:N, or auto (cuda if available); overrides the grid's own "
                                    "device (default: the grid's, else auto)")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (a skipped results file, say) as one line each, without the source location."""
    print(f"warning: {message}", file=sys.stderr)


def _early_fork_server(argv: list[str]):
    """For ``run`` (or no command: the default grid) without ``--in-process``, ``--slurm`` or ``--help``: the
    workers' fork server, started before anything else (building the parser imports pandas: 0.25 s)."""
    from bench import forkserver

    words = [w for w in argv if not w.startswith("-")]
    if (words[:1] not in (["run"], ["plan"], [])) or {"--in-process", "--slurm", "-h", "--help"} & set(argv) \
            or not forkserver.available():
        return None
    return forkserver.ForkServer().start()


def main(argv: list[str] | None = None) -> int:
    server = _early_fork_server(sys.argv[1:] if argv is None else list(argv))
    try:
        return _main(argv, server)
    finally:
        if server is not None:
            server.close(wait=argv is not None)  # run_bench.py itself ends next: no need to wait


def _main(argv: list[str] | None, server) -> int:
    args = build_parser().parse_args(argv)
    args.fork_server = server
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import warnings

    from bench.errors import StoreFailed, UsageError
    from reports.results import FolderBusy

    warnings.showwarning = _show_warning
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "plan":
            return cmd_plan(args)
        if args.cmd == "report":
            return cmd_report(args)
        if args.cmd == "list":
            return cmd_list(args)
        if args.cmd == "check":
            return cmd_check(args)
        if args.cmd == "baseline":
            return cmd_baseline(args)
        if args.cmd == "compare":
            return cmd_compare(args)
        if args.cmd == "history":
            return cmd_history(args)
        if args.cmd == "status":
            return cmd_status(args)
        return cmd_default(args)
    except (UsageError, FolderBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoreFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `run_bench.py list | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted: stored cells are kept; run the same command again to finish the grid", file=sys.stderr)
        return 130


def _exit(code: int) -> None:
    """Leave without tearing the interpreter down, which takes 0.3 s once torch is imported: the exit handlers run
    and the streams are flushed (every file this process wrote was closed by its writer)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
