"""Supervision of the embedded servers: each one a foreground child process of ours.

Each server is a foreground child of this process listening on 127.0.0.1:PORT, with its data under
a directory the caller owns, so restarts, ``kill -9`` fault tests and ports are ours to control.

Children never outlive us: ``stop()`` is the normal path, a ``weakref.finalize`` hook stops what is
still running at interpreter exit (or when the handle is garbage collected), and on Linux every
child carries ``PR_SET_PDEATHSIG=SIGKILL`` so it dies even when we are killed with SIGKILL. A plain
SIGTERM with Python's default disposition skips atexit hooks; the children then get SIGKILL from
the kernel (Valkey may lose up to one second of AOF, Postgres recovers from WAL), so a service
should handle SIGTERM and call ``stop()``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from inventory_svc.embedded.errors import EmbeddedServerError
from inventory_svc.embedded.files import _log_size, _log_tail, _open_log, _read_password

START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0
EXIT_STOP_TIMEOUT = 5.0

_POLL_INTERVAL = 0.01
_PR_SET_PDEATHSIG = 1


class _PortInUse(EmbeddedServerError):
    pass


# --------------------------------------------------------------------------------------------------
# process helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc, or None if there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def _pid_alive(pid: int) -> bool:
    """True if pid is a live process (zombies count as dead: they hold no ports or memory)."""
    if Path("/proc/self/stat").exists():
        info = _proc_stat(pid)
        return info is not None and info[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _child_pids(pid: int) -> list[int]:
    """Direct children of pid (Linux /proc; empty elsewhere)."""
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            info = _proc_stat(int(entry))
            if info is not None and info[1] == pid:
                children.append(int(entry))
    return children


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Poll until every pid is gone; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if _pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
        alive = [pid for pid in alive if _pid_alive(pid)]
    return alive


def _freeze(pid: int, timeout: float = 1.0) -> None:
    """SIGSTOP pid and wait until it is stopped: a stopped process forks no more children, so
    a list of its children taken afterwards is complete (Linux /proc; best effort elsewhere)."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _proc_stat(pid)
        if info is None or info[0] in ("T", "t", "Z", "X"):
            return
        time.sleep(0.001)


def _reap(proc: subprocess.Popen[bytes], owner_pid: int, sig: int, timeout: float) -> None:
    """_terminate, but only in the process that started the child (and only if it still runs)."""
    if os.getpid() != owner_pid or proc.poll() is not None:
        return
    _terminate(proc, sig, timeout)


def _terminate(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send sig, wait up to timeout, then SIGKILL."""
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
    except ProcessLookupError:
        proc.wait()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------------------------------
# spawning with PR_SET_PDEATHSIG


_prctl: Any = None
_prctl_lock = threading.Lock()


def _libc_prctl() -> Any:
    global _prctl
    with _prctl_lock:
        if _prctl is None:
            if not sys.platform.startswith("linux"):
                _prctl = False
            else:
                try:
                    fn = ctypes.CDLL(None, use_errno=True).prctl
                except (OSError, AttributeError):
                    _prctl = False
                else:
                    fn.argtypes = [
                        ctypes.c_int,
                        ctypes.c_ulong,
                        ctypes.c_ulong,
                        ctypes.c_ulong,
                        ctypes.c_ulong,
                    ]
                    fn.restype = ctypes.c_int
                    _prctl = fn
        return _prctl


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when the thread that forked it dies.

    CPython runs setgroups/setregid/setreuid (Popen's extra_groups/group/user) *before* preexec_fn,
    and the kernel clears the parent-death signal on any change of effective uid/gid, so setting it
    here, after the credential switch, is the order that sticks.
    """
    prctl = _libc_prctl()
    if not prctl:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class _Spawner:
    """Forks children from a thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Children
    started from a short-lived thread (asyncio.to_thread, an executor) would be killed with it, so
    every fork outside the main thread is done on one daemon thread that only ends with the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], subprocess.Popen[bytes]], concurrent.futures.Future[Any]]
        ]
        self._jobs = queue.SimpleQueue()
        self._owner_pid = -1

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        def launch() -> subprocess.Popen[bytes]:
            # A process group of its own: Ctrl-C in a terminal reaches only the service, which
            # drains its calls and then stops the servers in order (PDEATHSIG still covers -9).
            return subprocess.Popen(
                list(args), preexec_fn=pdeathsig_preexec(), process_group=0, **kwargs)

        if threading.current_thread() is threading.main_thread():
            return launch()
        future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        with self._lock:
            if self._owner_pid != os.getpid():  # first use, or we are a fork() of the owner
                self._jobs = queue.SimpleQueue()
                threading.Thread(
                    target=self._serve, args=(self._jobs,), name="embedded-spawner", daemon=True
                ).start()
                self._owner_pid = os.getpid()
            self._jobs.put((launch, future))
        return future.result()

    @staticmethod
    def _serve(
        jobs: queue.SimpleQueue[
            tuple[Callable[[], subprocess.Popen[bytes]], concurrent.futures.Future[Any]]
        ],
    ) -> None:
        while True:
            job, future = jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)


_spawner = _Spawner()


# --------------------------------------------------------------------------------------------------
# the common lifecycle


class _ChildServer:
    """Lifecycle shared by both servers: one foreground child process on 127.0.0.1:port."""

    _name = "server"
    _stop_signal: int = signal.SIGTERM
    # Each server names its files in data_dir.
    _password_file: str  # generated at the first start, kept across restarts (0600)
    _log_file: str

    def __init__(self, data_dir: Path, port: int | None = None, *, durable: bool = True) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.durable = durable
        self._auto_port = port is None
        self._port = _free_port() if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._started_once = False
        self._lock = threading.RLock()
        self._password: str | None = None  # set by _prepare, or read from password_path

    # -- subclass hooks

    def _prepare(self) -> None:
        """Create and initialise the data directory; runs before every launch."""

    def _launch(self, log: int) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _ready(self, deadline: float) -> bool:
        """One readiness probe; True once the server answers real requests."""
        raise NotImplementedError

    def _failure_hint(self, log_tail: str) -> str:
        """Extra advice appended to a startup error."""
        return ""

    # -- public API

    @property
    def url(self) -> str:
        """Connection URL of the server."""
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        """The server's log file (inside the data directory)."""
        return self.data_dir / self._log_file

    @property
    def password_path(self) -> Path:
        """The 0600 file holding the password (inside the data directory)."""
        return self.data_dir / self._password_file

    @property
    def password(self) -> str:
        """The password that the URL carries, kept in :attr:`password_path` across restarts."""
        if self._password is None:
            self._password = _read_password(self.password_path)
            if self._password is None:
                raise EmbeddedServerError(f"{self._name} in {self.data_dir} was never started")
        return self._password

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1 (kept across restarts)."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Pid of the server process while it runs, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start the server (no-op if running) and wait until it serves requests; return its URL.

        Raises EmbeddedServerError, with the log's tail, if it is not ready within timeout seconds
        (the child is then killed). Crash recovery of a large durable cluster may need more.
        """
        with self._lock:
            if self.running:
                return self.url
            attempts = 3 if self._may_move() else 1
            for attempt in range(attempts):
                try:
                    self._start_once(timeout)
                    break
                except _PortInUse:
                    if attempt == attempts - 1:
                        raise
                    self._move()
            self._started_once = True
            return self.url

    def _may_move(self) -> bool:
        """Whether a port another process took between choosing and binding it may be traded
        for another: only a port we chose, before anyone was told it."""
        return self._auto_port and not self._started_once

    def _move(self) -> None:
        self._port = _free_port()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully; SIGKILL if the server has not exited within timeout seconds."""
        self._end(lambda proc: _terminate(proc, self._stop_signal, timeout), timeout)

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests); wait until it and its children exit."""
        # Postgres refuses to start while backends of a killed postmaster still hold its shared
        # memory; they exit by themselves once they notice the postmaster is gone. The postmaster
        # is frozen first: killed in the middle of a start, it was still forking its first
        # processes, and one forked after the list of children was taken held the memory on.
        self._end(_kill, STOP_TIMEOUT, freeze=True)

    def restart(self, timeout: float = START_TIMEOUT) -> str:
        """Stop (if running) and start again on the same port and data directory."""
        with self._lock:
            self.stop()
            return self.start(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"{type(self).__name__}({str(self.data_dir)!r}, port={self._port}, {state})"

    # -- internals

    def _start_once(self, timeout: float) -> None:
        self._prepare()
        log_start = _log_size(self.log_path)
        log = _open_log(self.log_path)
        try:
            proc = self._launch(log)
        finally:
            os.close(log)
        self._proc = proc
        self._finalizer = weakref.finalize(
            self, _reap, proc, os.getpid(), self._stop_signal, EXIT_STOP_TIMEOUT
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                if proc.poll() is not None:
                    tail = _log_tail(self.log_path, log_start)
                    error = _PortInUse if "Address already in use" in tail else EmbeddedServerError
                    raise error(
                        f"{self._name} exited with code {proc.returncode} during startup; "
                        f"log {self.log_path}:\n{tail}{self._failure_hint(tail)}"
                    )
                if self._ready(deadline):
                    return
                if time.monotonic() >= deadline:
                    raise EmbeddedServerError(
                        f"{self._name} did not become ready within {timeout:g} s on port "
                        f"{self._port}; log {self.log_path}:\n{_log_tail(self.log_path, log_start)}"
                    )
                time.sleep(_POLL_INTERVAL)
        except BaseException:
            self.kill()
            raise

    def _end(self, end: Callable[[subprocess.Popen[bytes]], None], children_timeout: float,
             *, freeze: bool = False) -> None:
        """end() the child if it runs, wait up to children_timeout for its children to exit.
        With `freeze` the child is stopped first, so that it forks none after the list."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                if freeze:
                    _freeze(proc.pid)
                children = _child_pids(proc.pid)
                end(proc)
                _wait_gone(children, children_timeout)
            self._forget()

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._proc = None
