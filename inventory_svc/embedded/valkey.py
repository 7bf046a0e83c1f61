"""Embedded Valkey (Redis-compatible): valkey-server as a supervised child process.

Reachable by other local users only with a password: valkey runs with ``requirepass`` (given on
its stdin, never on the world-readable command line) and ``protected-mode``, bound to 127.0.0.1,
and on a Unix socket of mode 0700 in its owner-only data dir (`local_url`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path
from urllib.parse import quote

from inventory_svc.embedded.binaries import valkey_server_binary
from inventory_svc.embedded.files import (
    _fits_unix_socket,
    _new_password,
    _read_password,
    _tighten,
    _write_private_file,
)
from inventory_svc.embedded.process import _ChildServer, _spawner

SOCKET_FILE = "valkey.sock"


class EmbeddedRedis(_ChildServer):
    """valkey-server (Redis protocol) as a child process on 127.0.0.1, password required.

    durable=True keeps an append-only file fsynced every second in data_dir; durable=False keeps
    nothing on disk but the password. RDB snapshots are always off. data_dir and everything the
    server writes there (AOF, log) are readable by their owner only.
    """

    _name = "valkey-server"
    _stop_signal = signal.SIGTERM  # graceful: fsyncs the AOF, like SHUTDOWN NOSAVE with save ""
    _password_file = "valkey.password"  # the requirepass password
    _log_file = "valkey.log"

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0`` (known once the server has been started)."""
        return f"redis://:{self.password}@127.0.0.1:{self._port}/0"

    @property
    def socket_path(self) -> Path | None:
        """The Unix socket the server also listens on, in its owner-only data dir; None when
        the path is too long for one (the kernel's limit is 107 bytes)."""
        path = self.data_dir.resolve() / SOCKET_FILE
        return path if _fits_unix_socket(path) else None

    @property
    def local_url(self) -> str:
        """The URL for a client on this machine: the Unix socket's when there is one
        (``unix://:PASSWORD@/PATH?db=0``: a round trip costs both sides about half the system
        time of TCP loopback's), else `url`."""
        path = self.socket_path
        if path is None:
            return self.url
        return f"unix://:{self.password}@{quote(str(path))}?db=0"

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

    def _config(self) -> list[str]:
        """Config lines given on stdin (secrets belong here, never on the command line)."""
        # _PASSWORD_RE admits no quote, backslash or blank: nothing to escape.
        return [f'requirepass "{self.password}"']

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
        if (path := self.socket_path) is not None:
            # 700 inside a 700 dir: only the service's own user reaches it, as with the password
            path.unlink(missing_ok=True)  # left by a server that was killed
            args += ["--unixsocket", str(path), "--unixsocketperm", "700"]
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
        with contextlib.suppress(BrokenPipeError):  # died at once: startup reports it with the log
            proc.stdin.write("".join(f"{line}\n" for line in self._config()).encode())
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

