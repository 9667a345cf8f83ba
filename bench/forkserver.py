"""Workers that start warm: a fork server that imports torch, numpy, the methods and the harness once, and forks a
fresh child for each worker, so a cell's process no longer pays the imports (about 1.4 s of ``import torch`` and
1.1 s of ``torch._dynamo``, which the first optimizer imports, on a 2-core CPU).

    with ForkServer() as server:                     # starts `python -m bench.forkserver` in the background
        proc = server.spawn(module="bench.worker", argv=[...], stdout=subprocess.PIPE, stderr=log)
        for line in proc.stdout: ...                 # a Popen-like handle: pid, poll, wait, send_signal, kill
        rc = proc.wait()                             # the child's exit code, negative for the signal that ended it

Each child is a process of its own, as a freshly started worker is: its peak memory, its crash, its out-of-memory
kill are its own, and the server itself never computes (no tensor, no CUDA, no thread pool: it only imports). What
a child starts with, and what differs from a fresh interpreter:

- its environment, working folder, standard streams and command line (``sys.argv``) are those asked for; the
  request's environment replaces the server's (``os.environ`` and the C library's, which CUDA reads at its start);
- CUDA is initialised in the child only, with the ``CUDA_VISIBLE_DEVICES`` the request gives; the torch thread pool
  likewise starts in the child, with the default thread count of a fresh process;
- random state: Python's ``random``, numpy's global generator and torch's default CPU generator are seeded from the
  operating system, as a fresh process seeds them (a cell seeds all three from its own seed anyway);
- stop signals (SIGTERM, SIGUSR1, SIGUSR2) and SIGINT have their default handling, or with ``stop=True`` the
  harness's stop flag (bench/stop.py) from the child's first instruction: a signal between the fork and that point is
  held, not lost (the server keeps them blocked; the child unblocks them once its handlers are in place);
- its resident memory starts as a fresh worker's does after the same imports: a fork maps the server's anonymous
  pages into the child but not the pages of the shared libraries (libtorch's code, some 330 MiB), which a fresh
  process maps as it loads them; the child maps the library pages the server has resident (MADV_POPULATE_READ,
  about 30 ms), so its peak RSS (``peak_rss_mib``) is what a fresh worker's would be, not 35% less;
- it dies with the server (PR_SET_PDEATHSIG), which dies with the process that started it;
- what differs: Python's hash seed is the server's (``PYTHONHASHSEED`` is read once, at an interpreter's start),
  modules are already imported (a module's import-time code ran once, in the server), and ``/proc/PID/cmdline``
  shows the server's command (its ``comm`` is ``snnbench-cell``). A request whose environment differs from the
  server's in a variable read at start-up (``START_ENV_PREFIXES``: the interpreter's, the loader's, the thread
  pools' and torch's own, PYTHONPATH among them) cannot be served: ``can_serve`` says so, and the caller starts a
  fresh process instead.

The server reads requests on a Unix socket, one connection per child: the request (JSON, with the child's three
standard streams passed as file descriptors), then ``pid N`` and, when the child ends, ``exit RC`` back. Standard
library only: ``bench.compare`` copies this file out of the tree and starts it with another checkout's code on the
path, whose modules it then preloads.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# what a worker imports, in this order (a name missing from an older tree is passed over). Beyond the worker's own
# imports, what a first cell imports lazily: torch._dynamo (torch.optim's first optimizer: 1.1 s), psutil (the CPU
# contention meter), tabulate (torch._dynamo's exit handler, dump_compile_times: 0.2 s at every worker's exit).
# "module:function" calls a cached function once: the code fingerprint (reads and parses every source file: 0.6 s)
# and the commit (two git processes), both of the code the server imported.
PRELOAD = ("torch", "numpy", "reports.results", "bench.runner", "bench.rows", "torch._dynamo", "psutil", "tabulate",
           "bench.fingerprint:_repo_code_hash", "bench.env:git_commit", "bench.env:cpu_model")
# variables read at an interpreter's or a library's start (before any request): a request that sets one of these
# otherwise than the server has them cannot be served by a fork; everything else is the request's own
START_ENV_PREFIXES = ("PYTHON", "LD_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "MALLOC_", "TORCH", "TRITON",
                      "NUMEXPR_", "VECLIB_")
PER_CHILD_ENV = ("PYTHONUNBUFFERED",)  # honoured per child
HELD = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)  # blocked in the server, unblocked in a child
CHILD_NAME = b"snnbench-cell"
CONNECT_S = 120.0  # how long a request waits for the server to listen (it binds before it imports)


def _prctl(option: int, arg) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg, 0, 0, 0)
    except Exception:  # pragma: no cover - not Linux
        pass


def set_pdeathsig() -> None:
    """Linux: this process is killed when the thread that started it ends (its parent's exit)."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def available() -> bool:
    """A fork server needs fork, Unix sockets that carry file descriptors, and pidfds (Linux 5.3)."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")


def start_env_differences(env: dict, server_env: dict) -> list[str]:
    """The variables read at start-up that ``env`` sets otherwise than ``server_env`` (sorted)."""
    keys = set(env) | set(server_env)
    return sorted(k for k in keys if k.startswith(START_ENV_PREFIXES) and k not in PER_CHILD_ENV
                  and env.get(k) != server_env.get(k))


# ---------------------------------------------------------------- the client side


class ServedProcess:
    """A child of the fork server, handled like a ``subprocess.Popen``: ``pid``, ``returncode``, ``poll``,
    ``wait(timeout)``, ``send_signal``, ``terminate``, ``kill``, and ``stdin``/``stdout``/``stderr`` where a pipe
    was asked for. Its exit code comes from the server (which reaps it); a server that dies first leaves the
    code ``LOST``."""

    LOST = -signal.SIGKILL  # the server went away before it said how the child ended: it was killed with it

    def __init__(self, conn: socket.socket, pid: int, args, streams: tuple, buffered: bytes = b"") -> None:
        self._conn, self.pid, self.args = conn, pid, args
        self.stdin, self.stdout, self.stderr = streams
        self.returncode: int | None = None
        self._buf = buffered  # what the server sent after the pid line
        self._reading = threading.Lock()  # one reader of the connection at a time (a slot's thread, a handler)

    def _read_exit(self, timeout: float | None) -> None:
        """Read the server's ``exit RC`` line (or the connection's end) for at most ``timeout`` seconds. Another
        thread reading, or the frame a signal handler interrupted (Slurm's checkpoint handler waits for the child;
        the launcher's forwards a stop), is waited for instead, never read beside."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._reading.acquire(blocking=False):
            while self.returncode is None and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.01)
            return
        try:
            self._read_locked(deadline)
        finally:
            self._reading.release()

    def _read_locked(self, deadline: float | None) -> None:
        while self.returncode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if not select.select([self._conn], [], [], left)[0]:
                    return
                chunk = self._conn.recv(4096)
            except (OSError, ValueError):  # the connection was reset: the server is gone
                chunk = b""
            if self.returncode is not None:
                break
            self._buf += chunk
            for line in self._buf.split(b"\n")[:-1]:
                if line.startswith(b"exit "):
                    self.returncode = int(line.split()[1])
            if self.returncode is None and not chunk:
                self.returncode = self.LOST
        self._conn.close()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read_exit(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read_exit(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _stream(spec, mode: str) -> tuple[int | None, object | None]:
    """(the descriptor the child gets, the parent's end as a file) for a Popen-style ``stdin``/``stdout``/``stderr``
    argument: None (this process's own), ``subprocess.PIPE``, ``subprocess.DEVNULL``, a file or a descriptor."""
    if spec is None:
        return None, None
    if spec == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None
    if spec == subprocess.PIPE:
        r, w = os.pipe()
        if mode == "w":  # the child reads: we write
            return r, open(w, "w", buffering=1, encoding="utf-8")
        return w, open(r, "r", encoding="utf-8", errors="replace")
    fd = spec if isinstance(spec, int) else spec.fileno()
    return os.dup(fd), None


class ForkServer:
    """A fork server for workers of one source tree (``root``, put first on the children's path), preloading
    ``preload``. Start it in the thread that outlives it (the main thread): it dies with that thread. ``script``:
    a copy of this file to start instead of ``-m bench.forkserver`` (a comparison runs another tree's code)."""

    def __init__(self, root: Path | None = None, preload: tuple[str, ...] = PRELOAD, env: dict | None = None,
                 script: Path | None = None) -> None:
        from . import REPO

        self.root = Path(root or REPO)
        self.preload, self.script = tuple(preload), script
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = str(self.root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def socket_path(self) -> Path:
        assert self._dir is not None, "start() the server first"
        return Path(self._dir.name) / "sock"

    @property
    def log_path(self) -> Path:
        return Path(self._dir.name) / "server.log"

    def start(self) -> "ForkServer":
        if self.proc is not None:
            return self
        self._dir = tempfile.TemporaryDirectory(prefix="snnbench-fork-")
        entry = [str(self.script)] if self.script else ["-m", "bench.forkserver"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, *entry, str(self.socket_path), ",".join(self.preload)],
                                         cwd=self.root, env=self.env, stdin=subprocess.PIPE, stdout=log, stderr=log,
                                         preexec_fn=set_pdeathsig)
        return self

    def __enter__(self) -> "ForkServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, wait: bool = True) -> None:
        """End the server (its stdin closes; it exits at once); a child still running is killed with it. ``wait``:
        for it to be gone (a process about to end itself need not: 0.06 s)."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            if wait:
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._dir.cleanup()

    def can_serve(self, env: dict) -> bool:
        """Whether a child with environment ``env`` can be forked (``start_env_differences``), rather than started."""
        return available() and not start_env_differences(env, self.env)

    def _failed(self, what: str) -> RuntimeError:
        log = self.log_path.read_text(errors="replace")[-2000:] if self._dir else ""
        return RuntimeError(f"the fork server {what}" + (f"; its log:\n{log}" if log.strip() else ""))

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + CONNECT_S
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise self._failed(f"is not running (exit {self.proc.returncode if self.proc else None})")
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(str(self.socket_path))
                return conn
            except (FileNotFoundError, ConnectionRefusedError):
                conn.close()
                if time.monotonic() > deadline:
                    raise self._failed(f"did not listen within {CONNECT_S:g} s") from None
                time.sleep(0.005)

    def spawn(self, module: str | None = None, script: str | None = None, argv: list[str] = (), env: dict | None = None,
              cwd: str | Path | None = None, stdin=None, stdout=None, stderr=None, stop: bool = False) -> ServedProcess:
        """A child running ``module`` (as ``python -m``) or ``script`` (as ``python script``) with ``argv``.
        ``env`` (default: the server's) must pass ``can_serve``. ``stop``: the child handles stop signals with
        bench/stop.py's flag from its start. Raises RuntimeError when the server cannot fork it."""
        assert (module is None) != (script is None), "one of module or script"
        env = dict(self.env if env is None else env)
        if not self.can_serve(env):
            raise RuntimeError("a fork cannot have a different start-up environment: "
                               + ", ".join(start_env_differences(env, self.env)))
        fds, streams = [], []
        for spec, mode in ((stdin, "w"), (stdout, "r"), (stderr, "r")):
            fd, mine = _stream(spec, mode)
            fds.append(fd if fd is not None else os.dup(len(fds)))
            streams.append(mine)
        req = {"module": module, "script": script, "argv": list(argv), "env": env,
               "cwd": str(cwd or self.root), "stop": stop}
        payload = json.dumps(req).encode()
        try:
            conn = self._connect()
            socket.send_fds(conn, [struct.pack("!I", len(payload)) + payload], fds)
            reply = b""
            while b"\n" not in reply:
                chunk = conn.recv(64)
                if not chunk:
                    raise self._failed("ended before it forked the child")
                reply += chunk
        except BaseException:
            for s in streams:
                if s is not None:
                    s.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        line, _, rest = reply.partition(b"\n")
        if not line.startswith(b"pid "):
            conn.close()
            raise self._failed(f"could not fork: {reply.decode(errors='replace').strip()}")
        return ServedProcess(conn, int(line.split()[1]), [module or script, *argv], tuple(streams), rest)


# ---------------------------------------------------------------- the server side


def _preload(names: list[str]) -> None:
    for name in names:
        mod, _, fn = name.partition(":")
        try:
            m = importlib.import_module(mod)
            if fn:
                getattr(m, fn)()
        except Exception as e:  # an older tree without this module: its children import what they need
            print(f"fork server: not preloaded: {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MADV_POPULATE_READ = 22  # Linux 5.14


def resident_file_pages() -> list[tuple[int, int]]:
    """(address, length) of the runs of pages of readable file mappings (shared libraries, mapped files) that are in
    this process's page tables: what loading them made resident."""
    import numpy as np

    runs: list[tuple[int, int]] = []
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or not fields[5].startswith("/") or "r" not in fields[1]:
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(lo // PAGE * 8)
            present = (np.frombuffer(pagemap.read((hi - lo) // PAGE * 8), dtype=np.uint64) >> np.uint64(63)) > 0
            edges = np.diff(np.concatenate(([0], present.view(np.int8), [0])))
            runs += [(lo + int(a) * PAGE, int(b - a) * PAGE)
                     for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]
    return runs


def map_pages(runs: list[tuple[int, int]]) -> None:  # pragma: no cover - a child
    """Put ``runs`` (``resident_file_pages`` of the server) into this process's page tables, as loading the libraries
    put them into a fresh process's: ``madvise(MADV_POPULATE_READ)``, or reading a byte of each page before 5.14."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for addr, length in runs:
        if libc.madvise(addr, length, MADV_POPULATE_READ) != 0:
            import numpy as np

            np.frombuffer((ctypes.c_char * length).from_address(addr), dtype=np.uint8)[::PAGE].sum()


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(30)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        more = conn.recv(1 << 20)
        if not more:
            raise ConnectionError("the request ended early")
        data += more
    n = struct.unpack("!I", data[:4])[0]
    if len(fds) != 3:
        raise ConnectionError(f"a request carries 3 descriptors, not {len(fds)}")
    return json.loads(data[4:4 + n]), fds


def _std_stream(fd: int, unbuffered: bool):
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                            line_buffering=True, write_through=unbuffered)


def _child(req: dict, fds: list[int], server_pid: int, inherited: list[int],
           resident: list[tuple[int, int]]) -> None:  # pragma: no cover - a child
    """In the forked child: become the worker the request describes, run it, and exit with its code."""
    code = 1
    try:
        set_pdeathsig()
        if os.getppid() != server_pid:  # the server died between the fork and the line above
            os._exit(1)
        _prctl(15, CHILD_NAME)  # PR_SET_NAME: what ps and top show
        for fd in inherited:  # the server's socket, its other children's connections and pidfds, its control pipe
            try:
                os.close(fd)
            except OSError:
                pass
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        env = req["env"]
        os.environ.clear()
        os.environ.update(env)
        unbuffered = bool(env.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout, sys.stderr = _std_stream(1, unbuffered), _std_stream(2, True)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        os.chdir(req["cwd"])
        for s in HELD:  # a fresh process's handling; then the stop flag, before anything can arrive
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        if req.get("stop"):
            from bench.stop import STOP

            STOP.clear()
            STOP.install()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
        map_pages(resident)
        _reseed()
        _leave_server_finalizers()
        code = _run(req)
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


def _leave_server_finalizers() -> None:  # pragma: no cover - a child
    """The exit finalizers the server's imports registered (torch.library's 187 operator deregistrations, 30 ms)
    would undo, in a process about to end, what importing did, with nothing to show for it: a child leaves them
    out. Those its own code registers (a temporary folder's removal, say) run at its exit as usual."""
    import weakref

    for f in list(getattr(weakref.finalize, "_registry", {})):
        f.atexit = False


def _reseed() -> None:
    """Random state as a fresh process has it: Python's, numpy's and torch's (CPU) default generators seeded from
    the system. (torch's CUDA generators are created in the child, seeded as in any process.)"""
    import random

    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.random.default_generator.seed()


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _run(req: dict) -> int:  # pragma: no cover - a child
    import runpy

    try:
        if req["module"]:
            spec = importlib.util.find_spec(req["module"])
            sys.argv = [spec.origin if spec and spec.origin else req["module"], *req["argv"]]
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [req["script"], *req["argv"]]
            sys.path.insert(0, str(Path(req["script"]).resolve().parent))
            runpy.run_path(req["script"], run_name="__main__")
    except SystemExit as e:
        return _exit_code(e)
    return 0


def serve(path: str, preload: list[str]) -> int:
    """The server's loop: bind, preload, then fork a child per request and report its pid and exit code; end when
    stdin closes (the client is done) or the client dies (PR_SET_PDEATHSIG)."""
    set_pdeathsig()
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)  # held for the children: the server itself only imports
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    _preload(preload)
    try:
        resident = resident_file_pages()
    except (OSError, ImportError) as e:  # no pagemap (not Linux) or no numpy: children map pages as they touch them
        print(f"fork server: resident pages not read: {e}", file=sys.stderr, flush=True)
        resident = []
    sys.stdout.flush()
    sys.stderr.flush()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    me = os.getpid()
    while True:
        for key, _ in sel.select():
            if key.data == "control":
                if not os.read(key.fd, 4096):  # the client closed it: done, with nothing to clean up (an
                    os._exit(0)  # interpreter's orderly exit after torch's imports takes a second)
            elif key.data == "accept":
                conn, _ = listener.accept()
                try:
                    req, fds = _recv_request(conn)
                except (OSError, ValueError, ConnectionError) as e:
                    print(f"fork server: bad request: {e}", file=sys.stderr, flush=True)
                    conn.close()
                    continue
                inherited = [listener.fileno(), sys.stdin.fileno(), conn.fileno(), sel.fileno(),
                             *children, *(c.fileno() for _, c in children.values())]
                pid = os.fork()
                if pid == 0:
                    _child(req, fds, me, inherited, resident)
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, conn)
                sel.register(pidfd, selectors.EVENT_READ, "child")
                try:
                    conn.sendall(f"pid {pid}\n".encode())
                except OSError:
                    pass
            else:  # a child ended: reap it, tell its client
                pid, conn = children.pop(key.fd)
                sel.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                try:
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], [n for n in sys.argv[2].split(",") if n]))
