"""The environment a result was measured in: versions, commit, device, host, time."""

from __future__ import annotations

import datetime as dt
import platform
import socket
import subprocess
from functools import lru_cache
from pathlib import Path

from . import REPO


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    import torch

    from methods import __version__

    env = {
        "snnbench_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "gpu_name": None,
        "start_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if getattr(device, "type", "cpu") == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["cudnn_version"] = torch.backends.cudnn.version()
    return env


def device_slug(name: str) -> str:
    """A file-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.env --device-slug``: the slug of cuda:0's name (``cpu`` without a GPU), for baseline names."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.env")
    p.add_argument("--device-slug", action="store_true", required=True)
    p.parse_args(argv)
    import torch

    print(device_slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
