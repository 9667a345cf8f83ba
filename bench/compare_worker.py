"""One side of a speed comparison (bench/compare.py): runs cells with *another checkout's* code, one step at a time.

The comparison copies this file out of the tree and starts it with ``PYTHONPATH`` set to a side's source tree, so
``bench.runner`` below is that side's runner, not ours. Protocol, one JSON object per line:

    driver -> worker   {"cell": {...}}       run this cell
                       "go"                  run the next step
    worker -> driver   @cmp {"ready": ...}   imported the side's code (which files, to check the right ones ran)
                       @cmp {"step": k}      step k of the cell is done; waits for "go" before the next
                       @cmp {"result": ...}  the cell's row (its measured columns) and its per-step times

A worker waits between steps, so steps of the two sides never overlap: each runs on a machine the other leaves idle,
and the two sides' k-th steps are measured next to each other in time.
"""

from __future__ import annotations

import json
import os
import sys

PREFIX = "@cmp "
ROW_FIELDS = ("status", "error", "key", "method", "T", "num_params", "saved_for_backward_mib", "measured_steps",
              "step_time_ms_median", "code_fingerprint")


def say(obj) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_go() -> bool:
    line = sys.stdin.readline()
    return line.strip() == '"go"'


def main() -> int:
    import bench
    from bench.grid import Cell
    from bench.runner import run_cell

    say({"ready": True, "bench": os.path.dirname(os.path.abspath(bench.__file__))})
    for line in sys.stdin:
        msg = json.loads(line)
        if not isinstance(msg, dict) or "cell" not in msg:
            break

        def step_done(d: dict) -> None:
            say({"step": d.get("step")})
            if not wait_go():
                raise SystemExit(0)  # the driver is gone or asked to stop

        res = run_cell(Cell(**msg["cell"]), None, step_done)
        series = getattr(res, "series", None)
        row = {k: res.row.get(k) for k in ROW_FIELDS}
        if series is None:
            row.update(status="error", error="this revision's runner records no per-step times (Result.series); "
                                              "compare needs a revision that has them")
        say({"result": {"row": row, "series": series or {}}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
