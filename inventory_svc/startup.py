"""What a start needs that an operator may have to fix, said in one line: a data dir already in
use, a port already taken. Light on purpose: the worker supervisor uses it without the service."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "inventory-svc.lock"  # in the data dir, held while embedded stores run on it


class StartupError(RuntimeError):
    """The service cannot start for a reason its operator must fix (the CLI prints one line)."""


@contextlib.contextmanager
def hold_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold the data dir for this process (an flock, gone with the process however it ends):
    a second `serve`, or a `migrate`, on a dir in use is refused in one line, before it touches
    the running service's embedded servers."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)  # as the embedded servers would
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot use the data dir {data_dir}: {exc.strerror or exc}; give "
                           "another with --data-dir (or INVENTORY_DATA_DIR)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StartupError(
                f"the data dir {data_dir} is in use by another inventory-svc (pid {holder}); stop "
                "it first, or give this one another --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def check_port(host: str, port: int) -> None:
    """Fail fast (before any store starts) when the port is taken: bind it as a lone gRPC
    server does (SO_REUSEADDR, no SO_REUSEPORT, so a port shared by another service's workers
    counts as taken too) and let go. Port 0 is always free."""
    if not port:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        raise StartupError(port_problem(f"{host}:{port}", exc.strerror or str(exc))) from None


def port_problem(address: str, why: str) -> str:
    return (f"cannot listen on {address}: {why} (another inventory-svc?); choose another "
            "port (--port, INVENTORY_PORT)")
