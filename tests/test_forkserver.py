"""Workers that start warm (bench/forkserver.py): a child of the fork server starts as a fresh worker would (its
environment, working folder, arguments, random state, thread count; no CUDA), ends with the code or the signal a
process would, keeps a stop signal sent at any moment, dies with the server; and through the real command line,
one cell's peak memory, out-of-memory or crash never shows in another cell's row."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from bench import forkserver
from bench.forkserver import ForkServer, ServedProcess
from reports.results import load_results

from .helpers import REPO, cli, wait_for

pytestmark = pytest.mark.skipif(not forkserver.available(), reason="fork server: Linux with pidfds only")

PROBE = """
import json, os, random, sys
import numpy as np
import torch
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                  "cuda_initialised": torch.cuda.is_initialized(), "threads": torch.get_num_threads(),
                  "random": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(1).item(),
                  "torch_seed": torch.initial_seed(), "ppid": os.getppid()}))
"""

WAIT_FOR_STOP = """
import sys, time
from bench.stop import STOP
print("running", flush=True)
deadline = time.monotonic() + 60
while not STOP.requested and time.monotonic() < deadline:
    time.sleep(0.01)
print(STOP.name, flush=True)
"""


@pytest.fixture(scope="module")
def server():
    with ForkServer() as s:
        yield s


def _probe(server, tmp_path, **kw) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    p = server.spawn(script=str(script), stdout=subprocess.PIPE, **kw)
    out = p.stdout.read()
    assert p.wait() == 0
    return json.loads(out)


def test_a_child_starts_as_a_fresh_worker(server, tmp_path):
    env = {**server.env, "PROBE": "asked", "CUDA_VISIBLE_DEVICES": ""}
    a = _probe(server, tmp_path, argv=["--x", "1"], env=env, cwd=str(tmp_path))
    b = _probe(server, tmp_path)
    fresh = json.loads(subprocess.run([sys.executable, str(tmp_path / "probe.py")], capture_output=True, text=True,
                                      env=server.env, check=True).stdout)
    assert a["argv"] == ["--x", "1"] and a["cwd"] == str(tmp_path) and a["probe"] == "asked"
    assert b["probe"] is None and b["cwd"] == str(REPO)  # the server's environment and folder by default
    assert not a["cuda_initialised"] and not b["cuda_initialised"]  # the server imported torch, nothing more
    assert a["threads"] == b["threads"] == fresh["threads"]
    # every generator seeded afresh, as in two fresh processes: no two children share a stream
    for k in ("random", "numpy", "torch", "torch_seed"):
        assert a[k] != b[k], k
    assert a["ppid"] == b["ppid"] == server.proc.pid


RESIDENT = """
import importlib, json, sys
from bench.forkserver import PRELOAD
for name in PRELOAD:  # what the server imported, so that a fresh process has what a child inherits
    module, _, fn = name.partition(":")
    m = importlib.import_module(module)
    if fn:
        getattr(m, fn)()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({k: int(status[k].split()[0]) for k in ("VmRSS", "RssFile", "RssAnon")}))
"""


def test_a_childs_resident_memory_is_a_fresh_workers(server, tmp_path):
    """A fork leaves the shared libraries' pages out of the child's page tables (RssFile near 0, a third less RSS);
    the child maps those the server has, so its RSS is a fresh process's after the same imports (within 5%)."""
    script = tmp_path / "resident.py"
    script.write_text(RESIDENT)
    p = server.spawn(script=str(script), stdout=subprocess.PIPE)
    child = json.loads(p.stdout.read())
    assert p.wait() == 0
    fresh = json.loads(subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=server.env,
                                      check=True, cwd=REPO).stdout)
    assert fresh["RssFile"] > 100_000  # kB: libtorch's pages, which a fork alone would not map
    for k in ("VmRSS", "RssFile"):
        assert abs(child[k] - fresh[k]) < 0.05 * fresh[k], (k, child, fresh)


def test_exit_codes_signals_and_a_held_stop(server, tmp_path):
    (tmp_path / "exit3.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "raise.py").write_text("raise ValueError('boom')\n")
    (tmp_path / "sleep.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "stop.py").write_text(WAIT_FOR_STOP)
    assert server.spawn(script=str(tmp_path / "exit3.py")).wait() == 3
    err = tmp_path / "err.txt"
    with open(err, "w") as f:
        assert server.spawn(script=str(tmp_path / "raise.py"), stderr=f).wait() == 1
    assert "ValueError: boom" in err.read_text()
    p = server.spawn(script=str(tmp_path / "sleep.py"))
    assert p.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.2)
    p.kill()
    assert p.wait(timeout=30) == -signal.SIGKILL
    # without the stop flag a child ends of SIGUSR1 as a fresh process does; with it, a signal sent the moment the
    # child exists (before its script runs) is a request it sees, not a death
    p = server.spawn(script=str(tmp_path / "sleep.py"))
    p.send_signal(signal.SIGUSR1)
    assert p.wait(timeout=30) == -signal.SIGUSR1
    p = server.spawn(script=str(tmp_path / "stop.py"), stdout=subprocess.PIPE, stop=True)
    p.send_signal(signal.SIGUSR1)
    assert p.stdout.read().split() == ["running", "SIGUSR1"] and p.wait(timeout=30) == 0
    p = server.spawn(script=str(tmp_path / "stop.py"), stdout=subprocess.PIPE, stop=True)
    assert p.stdout.readline().strip() == "running"
    p.send_signal(signal.SIGTERM)
    assert p.stdout.read().split() == ["SIGTERM"] and p.wait(timeout=30) == 0


def test_two_threads_waiting_for_one_child_both_get_its_code(server, tmp_path):
    """A pool's slot thread waits for its worker while the main thread polls it (to forward a stop signal): one
    reads the server's answer, the other waits for it; neither takes the connection's end for a lost child."""
    import threading

    (tmp_path / "exit7.py").write_text("import time\ntime.sleep(0.5)\nraise SystemExit(7)\n")
    for _ in range(3):
        p = server.spawn(script=str(tmp_path / "exit7.py"))
        got = []
        threads = [threading.Thread(target=lambda: got.append(p.wait(timeout=30))) for _ in range(2)]
        for t in threads:
            t.start()
        while p.poll() is None:
            time.sleep(0.001)
        for t in threads:
            t.join()
        assert got == [7, 7] and p.poll() == 7


def test_the_server_ignores_stop_signals_and_its_children_die_with_it(tmp_path):
    (tmp_path / "sleep.py").write_text("print('up', flush=True)\nimport time\ntime.sleep(120)\n")
    with ForkServer() as s:
        p = s.spawn(script=str(tmp_path / "sleep.py"), stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == "up"
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            s.proc.send_signal(sig)  # Slurm signals every process of a step: the server is not one to stop
        time.sleep(0.3)
        assert s.proc.poll() is None and p.poll() is None
        s.proc.kill()
        assert p.wait(timeout=30) == ServedProcess.LOST
        wait_for(lambda: not os.path.exists(f"/proc/{p.pid}") or "Z" in open(f"/proc/{p.pid}/stat").read().split()[2],
                 timeout=30, what="the child gone with its server")


def test_a_different_start_up_environment_is_not_forked(server):
    assert server.can_serve({**server.env, "CUDA_VISIBLE_DEVICES": "1", "PYTHONUNBUFFERED": "1", "MINE": "x"})
    for k, v in (("OMP_NUM_THREADS", "1"), ("PYTHONHASHSEED", "3"), ("LD_PRELOAD", "x.so"),
                 ("PYTHONPATH", "/elsewhere")):
        assert not server.can_serve({**server.env, k: v}), k
        with pytest.raises(RuntimeError, match=k):
            server.spawn(script="x.py", env={**server.env, k: v})


ISOLATION = """name = "isolation"
[axes]
method = ["bptt_m"]
arch = ["mlp"]
dataset = ["synthetic:digits"]
T = [1]
seed = [0, 1, 2, 3]
[fixed]
kind = "profile"
batch_size = 64
steps = 2
warmup_steps = 0
arch_options = { widths = [64] }
[[override]]
match = { seed = 1 }
set = { batch_size = 4096, arch_options = { widths = [65536] } }
[[override]]
match = { seed = 2 }
set = { batch_size = 1024, arch_options = { widths = [16384] } }
"""


def test_a_cells_peak_memory_and_out_of_memory_stay_in_its_own_row(tmp_path):
    """Four cells through one fork server, under a 6 GiB address-space limit: a small one, one that runs out of
    memory, one that allocates some 400 MiB more than the small one, and the small one again (another seed). The
    last one's peak is the first one's, not the large one's, and it is ok."""
    grid = tmp_path / "isolation.toml"
    grid.write_text(ISOLATION)
    out = tmp_path / "res"
    limit = (resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
    r = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "run", str(grid), "--out", str(out), "--device",
                        "cpu"], capture_output=True, text=True, cwd=REPO, timeout=600,
                       preexec_fn=lambda: resource.setrlimit(*limit))
    assert r.returncode == 1, r.stderr  # one cell failed: the out-of-memory one
    rows = load_results(out).set_index("seed")
    assert rows.loc[1, "status"] == "oom" and "can't allocate memory" in rows.loc[1, "error"]
    assert (rows.loc[[0, 2, 3], "status"] == "ok").all()
    small, large, after = rows.loc[0, "peak_rss_mib"], rows.loc[2, "peak_rss_mib"], rows.loc[3, "peak_rss_mib"]
    assert large > small + 200, (small, large)
    assert abs(after - small) < 0.1 * small, (small, large, after)
    assert (rows["time_start_s"] < 60).all()  # every cell a child of the one server (not counted here: asserted
    logs = [(out / "logs" / f"{k}.log").read_text() for k in rows["key"]]  # in test_a_child_starts_...)
    assert not any("starting a fresh worker instead" in log for log in logs)


TIME_GRID = """name = "parts"
[axes]
method = ["bptt_m", "rate_m"]
arch = ["mlp"]
dataset = ["digits"]
T = [2]
kind = ["train", "profile", "fidelity"]
[fixed]
epochs = 2
batch_size = 64
train_subset = 256
warmup_steps = 1
steps = 3
arch_options = { widths = [32] }
[[exclude]]
kind = "fidelity"
method = "bptt_m"
[[override]]
match = { method = "bptt_m", kind = "train" }
set = { save_weights_at = [-1] }
[[override]]
match = { kind = "fidelity" }
set = { trained_by = "bptt_m", weights_at = [0, -1] }
"""


def test_the_time_parts_add_up_to_the_cells_wall_time(tmp_path):
    """Every kind of cell, through the real workers: the time_<part>_s columns add up to cell_wall_s within 10%
    (the parts are timed on their own; cell_wall_s from the cell's start to its row), and time_start_s is there."""
    from reports.results import TIME_PARTS

    grid = tmp_path / "parts.toml"
    grid.write_text(TIME_GRID)
    r = cli("run", str(grid), "--out", str(tmp_path / "res"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = load_results(tmp_path / "res")
    assert sorted(rows["kind"]) == ["fidelity", "profile", "profile", "train", "train"]
    for _, row in rows.iterrows():
        parts = {p: row[f"time_{p}_s"] for p in TIME_PARTS}
        total = sum(parts.values())
        assert abs(total - row["cell_wall_s"]) <= 0.1 * row["cell_wall_s"], (row["kind"], row["cell_wall_s"], parts)
        assert parts["steps"] > 0 and parts["store"] > 0 and parts["model"] > 0, (row["kind"], parts)
        assert 0 < row["time_start_s"] < row["cell_wall_s"] + 60
        if row["kind"] == "train":
            assert parts["eval"] > 0 and parts["warmup"] > 0


CUDA_CHILD = """
import json, os, torch
before = torch.cuda.is_initialized()
x = torch.ones(1024, device="cuda")
print(json.dumps({"before": before, "count": torch.cuda.device_count(), "sum": float(x.sum()),
                  "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


@pytest.mark.gpu
def test_cuda_starts_in_each_child_with_the_gpu_it_is_given(server, tmp_path):
    """On a GPU: the server never initialised CUDA, so each child starts it itself, seeing only the GPU its request's
    CUDA_VISIBLE_DEVICES names (the pool's slots rely on it), one child after another."""
    script = tmp_path / "cuda.py"
    script.write_text(CUDA_CHILD)
    for _ in range(2):
        p = server.spawn(script=str(script), env={**server.env, "CUDA_VISIBLE_DEVICES": "0"}, stdout=subprocess.PIPE)
        got = json.loads(p.stdout.read())
        assert p.wait() == 0
        assert got == {"before": False, "count": 1, "sum": 1024.0, "visible": "0"}
