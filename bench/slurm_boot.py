"""``python -m bench.slurm_boot -u -m submitit.core._submit FOLDER``: submitit's job entry point, with Slurm's
warning signal caught from the first moment of the process.

Slurm may send ``--signal=USR2@N`` up to a minute earlier than asked (its own words: "due to the resolution of
event handling"), so with a short time limit, or a preemption right at the start, USR2 can arrive while Python is
still importing, before submitit has installed its handler: the default action then kills the task and the job
ends FAILED instead of being requeued. This module installs a handler that only notes the signal (in the
environment, which the same process reads later), then runs submitit's entry point in the same process;
``SlurmTask.__call__``, which runs once submitit's own handler is in place, raises the noted signal again.
The window left is the interpreter's start and this module's import (tens of milliseconds).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

NOTED = "SNNBENCH_EARLY_SIGNAL"


def _note(signum, frame) -> None:
    os.environ[NOTED] = str(signum)


def redeliver() -> None:
    """Raise again a signal that arrived before submitit's handler was installed (call it after)."""
    signum = os.environ.pop(NOTED, None)
    if signum:
        signal.raise_signal(int(signum))


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGUSR2, _note)
    if "-m" not in argv:
        raise SystemExit("usage: python -m bench.slurm_boot [-u] -m MODULE ARGS...")
    i = argv.index("-m")
    module, rest = argv[i + 1], argv[i + 2:]
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
