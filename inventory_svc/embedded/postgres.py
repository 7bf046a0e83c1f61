"""Embedded PostgreSQL: the shipped ``postgres`` binary as a supervised child process.

Reachable by other local users only with a password: Postgres accepts scram-sha-256 only (no
``trust`` line, on TCP or on its unix socket). Without that, any local account could connect, and
a Postgres superuser session runs shell commands (``COPY ... FROM PROGRAM``) as the server's user.
The password is set in single-user mode from a SCRAM verifier on stdin: it never appears on a
command line (``/proc/PID/cmdline`` is world-readable) nor reaches the server. Run as root, the
server runs as an unprivileged system user (see pg_system).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from inventory_svc.embedded.binaries import postgres_bin_dir
from inventory_svc.embedded.errors import EmbeddedServerError
from inventory_svc.embedded.files import (
    _LOG_TAIL_BYTES,
    _fits_unix_socket,
    _log_size,
    _log_tail,
    _new_password,
    _open_log,
    _read_password,
    _write_private_file,
)
from inventory_svc.embedded.pg_system import (
    PG_SYSTEM_USER,
    _cluster_root,
    _ensure_system_user,
    _install_for,
)
from inventory_svc.embedded.pg_wire import _pg_session, _PgError, _quote_ident, _scram_verifier
from inventory_svc.embedded.process import _ChildServer, _pid_alive, _spawner

INITDB_TIMEOUT = 120.0
PG_SUPERUSER = "postgres"

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
    _password_file = "postgres.password"  # the superuser's password
    _log_file = "postgres.log"  # the server's and initdb's

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        database: str = "inventory",
        settings: Sequence[str] = (),
    ) -> None:
        if not database or "\0" in database:
            raise ValueError(f"invalid database name {database!r}")
        super().__init__(data_dir, port, durable=durable)
        self.database = database
        self.settings = tuple(settings)  # more "name=value" server settings (a benchmark's)
        self._user: pwd.struct_passwd | None = None
        self._root: Path | None = None  # the directory holding pgdata (and usually the socket)
        self._pgdata: Path | None = None  # pgdata, symlinks resolved
        self._bin: Path | None = None  # bin/ of the PostgreSQL build we run

    @property
    def url(self) -> str:
        """``postgresql://postgres:PASSWORD@127.0.0.1:PORT/<database>`` (once started)."""
        return (
            f"postgresql://{PG_SUPERUSER}:{self.password}@127.0.0.1:{self._port}/"
            f"{quote(self.database, safe='')}"
        )

    @property
    def local_url(self) -> str:
        """The URL for a client on this machine: over the server's Unix socket, in its 0700
        directory (``postgresql://postgres:PASSWORD@/<database>?host=DIR&port=PORT``). A round
        trip costs the client about half the CPU of TCP loopback's (~50 against ~70-120 µs for
        a one-row query, measured on a 2-core VM)."""
        return (
            f"postgresql://{PG_SUPERUSER}:{self.password}@/{quote(self.database, safe='')}"
            f"?host={quote(str(self.socket_dir), safe='/')}&port={self._port}"
        )

    @property
    def pgdata(self) -> Path:
        """The cluster directory (PGDATA), symlinks resolved once the server has been prepared."""
        return self._pgdata if self._pgdata is not None else self.data_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        """Directory holding the unix socket ``.s.PGSQL.PORT``."""
        base = self._root if self._root is not None else self.data_dir
        if _fits_unix_socket(base / f".s.PGSQL.{self._port}"):
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

    def _spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a postgres program in the cluster's directory, as the server's user."""
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        return _spawner.popen(args, cwd=self._root, **kwargs)

    def _prepare(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        bin_dir = postgres_bin_dir()
        if os.geteuid() == 0:
            self._user = _ensure_system_user(PG_SYSTEM_USER)
            bin_dir = _install_for(self._user, bin_dir)
            root = _cluster_root(self.data_dir, self._user, durable=self.durable)
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

    def _run_logged(self, args: list[str], timeout: float, what: str,
                    env: dict[str, str] | None = None) -> None:
        """Run a postgres tool as the server's user, its output appended to the log."""
        log_start = _log_size(self.log_path)
        log = _open_log(self.log_path)
        try:
            proc = self._spawn(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
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
        proc = self._spawn(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
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
            # WatchStock events carry their transaction's real commit time (else the time of its
            # last change): what a consumer's lag is measured from
            "track_commit_timestamp=on",
        ]
        if not self.durable:
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        elif sys.platform.startswith("linux"):
            # After a crash postgres syncs PGDATA before recovery; file-by-file fsync takes seconds.
            settings.append("recovery_init_sync_method=syncfs")
        settings += self.settings
        args = [
            str(self._bin / "postgres"),
            "-D", str(self._pgdata),
            "-h", "127.0.0.1",  # listen_addresses: loopback IPv4 only
            "-p", str(self._port),
            "-k", str(self.socket_dir),
        ]  # fmt: skip
        for setting in settings:
            args += ["-c", setting]
        return self._spawn(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

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
            # CREATE DATABASE copies a template and syncs it: on a busy machine it takes longer
            # than a probe, so it may use all the time start() has left, and a cut is retried
            # (a database it did create meanwhile is "duplicate", which is fine)
            _pg_session(
                self._port,
                PG_SUPERUSER,
                self.password,
                "postgres",
                [f"CREATE DATABASE {_quote_ident(self.database)}"],
                max(timeout, deadline - time.monotonic()),
            )
        except OSError:
            return False
        except _PgError as exc:
            if exc.sqlstate != "42P04":  # duplicate_database: someone else created it meanwhile
                raise EmbeddedServerError(
                    f"creating database {self.database!r} failed: {exc}"
                ) from exc
        return False  # probe again: ready once a connection to the database itself succeeds
