"""The embedded stores keep other local users out: passwords, private files, untouched parents.

Real servers, real data directories. Each store test here fails on the embedded stores as they
were before (trust auth, no Valkey password, 0644 files, parents chmod'ed o+x for the Postgres
user); the last ones cover the redaction of the URLs that now carry passwords.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from inventory_svc.embedded import (
    PG_SYSTEM_HOME,
    PG_SYSTEM_USER,
    EmbeddedPostgres,
    EmbeddedRedis,
    postgres_bin_dir,
)
from inventory_svc.embedded import postgres as embedded_postgres
from inventory_svc.embedded.pg_system import _ensure_system_user
from inventory_svc.redact import RedactingFilter, redact

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Linux /proc and prctl"
)

IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not IS_ROOT, reason="the Postgres system user exists only as root")





# ------------------------------------------------------------------------------------------------
# helpers


def pg_connect_error(**kwargs: Any) -> BaseException | None:
    """Try an asyncpg connection; the exception it raised, or None if it connected."""

    async def attempt() -> BaseException | None:
        # No ~/.pgpass or PGPASSWORD may supply the password behind the test's back.
        kwargs.setdefault("passfile", str(Path(__file__).with_name("no-such-pgpass")))
        try:
            conn = await asyncpg.connect(timeout=10, **kwargs)
        except Exception as exc:
            return exc
        await conn.close()
        return None

    return asyncio.run(attempt())


def pg_fetch(url: str, sql: str) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return asyncio.run(run())


def open_modes(root: Path) -> list[str]:
    """Every file and directory under root (root included, symlinks followed into their targets)
    that grants its group or others any permission."""
    found = []
    for dirpath, _dirs, files in os.walk(root, followlinks=True):
        for path in [dirpath, *(os.path.join(dirpath, name) for name in files)]:
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                found.append(f"{path} {stat.filemode(st.st_mode)}")
    return found


def ancestor_modes(path: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, uid, gid) of every directory above path, from / down."""
    return {
        str(parent): (st.st_mode, st.st_uid, st.st_gid)
        for parent in path.parents
        for st in [parent.stat()]
    }


def private_tree(top: Path) -> Path:
    """top/a (0700)/b (0750): directories that nobody but their owner (group: read only) may
    search, as a home directory or a pytest basetemp is."""
    middle = top / "a" / "b"
    middle.mkdir(parents=True)
    os.chmod(top / "a", 0o700)
    os.chmod(middle, 0o750)
    return middle


def run_as(user: pwd.struct_passwd, script: str, argv: list[str]) -> tuple[int, str, str]:
    """Runs `script` as `user` in a forked child (no interpreter of the user's own needed):
    its exit status, stdout and stderr."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, run, never return into pytest
        status = 1
        try:
            os.close(out_r)
            os.close(err_r)
            # pytest has replaced sys.stdout/stderr: write to the pipes themselves
            sys.stdout = os.fdopen(out_w, "w")
            sys.stderr = os.fdopen(err_w, "w")
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.chdir("/")
            sys.argv = ["intruder", *argv]
            exec(compile(script, "intruder", "exec"), {"__name__": "__main__"})
            sys.stdout.flush()
            status = 0
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(status)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as out, os.fdopen(err_r) as err:
        stdout, stderr = out.read(), err.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), stdout, stderr


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


# A local attacker, run as another user: stdlib only. It reports what it could do as JSON.
INTRUDER = r"""
import json, os, socket, struct, sys
pg_port, redis_port, paths = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
report = {}
for path in paths:
    try:
        if os.path.isdir(path):
            report[path] = sorted(os.listdir(path))
        else:
            with open(path, "rb") as fh:
                report[path] = fh.read().decode("latin-1")
    except OSError as exc:
        report[path] = type(exc).__name__
# Postgres: the startup packet of a client without a password. The old trust auth answered
# AuthenticationOk (R, 0) at once; now the server must ask for SASL (R, 10).
with socket.create_connection(("127.0.0.1", pg_port), timeout=10) as sock:
    body = struct.pack("!i", 196608) + b"user\0postgres\0database\0postgres\0\0"
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    header = sock.recv(5, socket.MSG_WAITALL)
    payload = sock.recv(struct.unpack("!i", header[1:])[0] - 4, socket.MSG_WAITALL)
    report["pg"] = [header[:1].decode(), struct.unpack("!i", payload[:4])[0]]
with socket.create_connection(("127.0.0.1", redis_port), timeout=10) as sock:
    sock.sendall(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
    report["redis"] = sock.recv(200).decode()
print(json.dumps(report))
"""


# ------------------------------------------------------------------------------------------------
# PostgreSQL


def test_postgres_refuses_connections_without_the_password(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedPostgres(data_dir / "pg", durable=False))
    url = server.start()
    parts = urlsplit(url)
    password = (data_dir / "pg" / "postgres.password").read_text()
    assert parts.password == password == server.password
    assert len(password) >= 40 and parts.username == "postgres"
    assert parts.hostname == "127.0.0.1" and parts.port == server.port

    tcp = {"host": "127.0.0.1", "port": server.port, "user": "postgres", "database": "inventory"}
    for attempt in ({}, {"password": "wrong-" + password}, {"password": password[:-1]}):
        error = pg_connect_error(**tcp, **attempt)
        assert isinstance(error, asyncpg.InvalidPasswordError), (attempt.keys(), error)
    # The unix socket too (a local user reaching it would otherwise get in without a password).
    error = pg_connect_error(**{**tcp, "host": str(server.socket_dir)})
    assert isinstance(error, asyncpg.InvalidPasswordError), error
    assert pg_connect_error(**tcp, password=password) is None

    rows = pg_fetch(url, "SELECT type, auth_method, error FROM pg_hba_file_rules")
    assert rows and {(r["auth_method"], r["error"]) for r in rows} == {("scram-sha-256", None)}
    assert {r["type"] for r in rows} == {"local", "host"}
    assert "trust" not in (server.pgdata / "pg_hba.conf").read_text()
    settings = pg_fetch(url, "SELECT name, setting FROM pg_settings WHERE name IN "
                             "('password_encryption', 'listen_addresses')")
    assert {r["name"]: r["setting"] for r in settings} == {
        "password_encryption": "scram-sha-256", "listen_addresses": "127.0.0.1"}
    verifier = pg_fetch(url, "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
    assert verifier[0]["rolpassword"].startswith("SCRAM-SHA-256$")
    assert password not in cmdline(server.pid)
    server.stop()
    assert password not in server.log_path.read_text()


def test_postgres_restart_on_the_same_data_dir_keeps_the_password(
    data_dir: Path, track: Any
) -> None:
    first = track(EmbeddedPostgres(data_dir, durable=True))
    url = first.start()
    assert urlsplit(url).password == (data_dir / "postgres.password").read_text()
    pg_fetch(url, "CREATE TABLE kept (x int)")
    pg_fetch(url, "INSERT INTO kept VALUES (7)")
    first.restart()
    assert first.url == url
    first.stop()

    # A new handle (a new process, in real life) on the same directory and port.
    again = track(EmbeddedPostgres(data_dir, first.port, durable=True))
    assert again.url == url  # known from the password file before the start
    assert again.start() == url
    assert pg_fetch(url, "SELECT x FROM kept")[0]["x"] == 7
    again.stop()


def test_postgres_files_are_private(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedPostgres(data_dir / "pg"))
    pg_fetch(server.start(), "CREATE TABLE t (x int)")
    sockets = [path for path in server.socket_dir.iterdir() if path.is_socket()]
    assert sockets and all(stat.S_IMODE(path.stat().st_mode) == 0o700 for path in sockets)
    server.stop()
    for name in ("postgres.password", "postgres.log"):
        assert stat.S_IMODE((data_dir / "pg" / name).stat().st_mode) == 0o600
    # data_dir itself, the password, the log and the whole cluster (followed through the link).
    assert open_modes(data_dir / "pg") == []
    if IS_ROOT:  # the cluster lives in the system user's home (mkdtemp is 0700)
        cluster = server.pgdata.parent
        assert cluster.parent == PG_SYSTEM_HOME / "clusters"
        assert open_modes(cluster) == []
        for path in (PG_SYSTEM_HOME, cluster.parent):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_postgres_upgrades_a_trust_cluster_made_by_an_older_version(
    data_dir: Path, track: Any
) -> None:
    # The layout an older version left: pgdata in data_dir (owned by the system user as root),
    # initdb --auth=trust, no password file, a log readable by all.
    spawn: dict[str, Any] = {}
    if IS_ROOT:
        user = _ensure_system_user(PG_SYSTEM_USER)
        os.chown(data_dir, user.pw_uid, user.pw_gid)
        spawn = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    bin_dir = postgres_bin_dir()
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data_dir / "pgdata"), "--auth=trust", "-U",
         "postgres", "--no-sync", "--no-locale", "--encoding=UTF8"],
        check=True, capture_output=True, cwd=data_dir, **spawn,
    )
    single = subprocess.run(
        [str(bin_dir / "postgres"), "--single", "-D", str(data_dir / "pgdata"), "postgres"],
        input=b"CREATE TABLE legacy (x int);\nINSERT INTO legacy VALUES (42);\n",
        check=True, capture_output=True, cwd=data_dir, **spawn,
    )
    assert b"ERROR" not in single.stdout + single.stderr
    hba = (data_dir / "pgdata" / "pg_hba.conf").read_text()
    assert any(line.split()[-1:] == ["trust"] for line in hba.splitlines() if line.strip())
    (data_dir / "postgres.log").write_text("old log\n")
    os.chmod(data_dir / "postgres.log", 0o644)

    server = track(EmbeddedPostgres(data_dir, durable=False, database="postgres"))
    url = server.start()
    assert server.pgdata == (data_dir / "pgdata").resolve()  # left where it was
    password = (data_dir / "postgres.password").read_text()
    assert urlsplit(url).password == password
    assert pg_fetch(url, "SELECT x FROM legacy")[0]["x"] == 42
    tcp = {"host": "127.0.0.1", "port": server.port, "user": "postgres", "database": "postgres"}
    assert isinstance(pg_connect_error(**tcp), asyncpg.InvalidPasswordError)
    error = pg_connect_error(**{**tcp, "host": str(server.socket_dir)})
    assert isinstance(error, asyncpg.InvalidPasswordError)
    assert "trust" not in (data_dir / "pgdata" / "pg_hba.conf").read_text()
    server.stop()
    assert open_modes(data_dir) == []


def test_no_directory_above_a_data_dir_changes_mode(data_dir: Path, track: Any) -> None:
    base = private_tree(data_dir) / "data"
    base.mkdir()
    os.chmod(base, 0o755)
    before = ancestor_modes(base / "pg")
    postgres = track(EmbeddedPostgres(base / "pg", durable=False))
    valkey = track(EmbeddedRedis(base / "redis", durable=True))
    pg_fetch(postgres.start(), "SELECT 1")
    assert redis.Redis.from_url(valkey.start(), socket_timeout=5).ping()
    assert ancestor_modes(base / "pg") == before
    if IS_ROOT:
        # The system user cannot search a/ (0700): the cluster lives in its own home instead.
        assert postgres.pgdata.is_relative_to(PG_SYSTEM_HOME / "clusters")
        assert (base / "pg" / "pgdata").is_symlink()
    postgres.restart()
    valkey.restart()
    postgres.stop()
    valkey.stop()
    assert ancestor_modes(base / "pg") == before
    assert open_modes(base / "pg") == open_modes(base / "redis") == []


@root_only
def test_a_private_copy_of_the_binaries_when_the_install_is_out_of_reach(
    data_dir: Path, track: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The build where pip put it, but under a directory the system user may not search (a venv
    # in /root): an older version made every directory above it searchable by all.
    shipped = postgres_bin_dir().parent  # site-packages/embedded_postgres/pginstall
    site = private_tree(data_dir) / "site-packages"
    install = site / "embedded_postgres" / "pginstall"
    shutil.copytree(shipped, install, symlinks=True)
    libs = shipped.parent.parent / "embedded_postgres.libs"  # libpq of initdb, found via RPATH
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    monkeypatch.setattr(embedded_postgres, "postgres_bin_dir", lambda: install / "bin")
    before = ancestor_modes(install / "bin" / "postgres")
    server = track(EmbeddedPostgres(data_dir / "pg", durable=False))
    pg_fetch(server.start(), "SELECT 1")
    exe = Path(os.readlink(f"/proc/{server.pid}/exe"))
    assert exe.is_relative_to(PG_SYSTEM_HOME) and exe.name == "postgres"
    server.stop()
    assert ancestor_modes(install / "bin" / "postgres") == before


@root_only
def test_clusters_of_deleted_data_dirs_are_collected(
    data_dir: Path, track: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def home_cluster(name: str, durable: bool) -> Path:
        (data_dir / name).mkdir()
        server = track(EmbeddedPostgres(private_tree(data_dir / name) / "pg", durable=durable))
        server.start()
        server.stop()
        cluster: Path = server.pgdata.parent
        assert cluster.parent == PG_SYSTEM_HOME / "clusters"
        return cluster

    gone = home_cluster("gone", durable=False)
    gone_durable = home_cluster("gone-durable", durable=True)
    kept = home_cluster("kept", durable=False)
    try:
        shutil.rmtree(data_dir / "gone")
        shutil.rmtree(data_dir / "gone-durable")
        # As if these data directories had not been under the temp directory: durable data there
        # gets a grace period (a moved data dir gets its cluster back by starting again).
        monkeypatch.setattr(tempfile, "tempdir", "/nonexistent-tmp")
        home_cluster("next", durable=False)  # a new cluster collects the orphans
        assert not gone.exists()
        assert kept.is_dir()  # its data directory is still there
        assert (gone_durable / "orphaned-since").is_file()
        assert json.loads((gone_durable / "owner.json").read_text())["durable"] is True
        # Under the temp directory, as they really are, durable or not: scratch, collected at once.
        monkeypatch.undo()
        home_cluster("next-again", durable=False)
        assert not gone_durable.exists()
        assert kept.is_dir()
    finally:
        shutil.rmtree(gone_durable, ignore_errors=True)


@root_only
def test_another_local_user_gets_nothing(data_dir: Path, track: Any) -> None:
    intruder = _ensure_system_user("inventory-intruder")  # a local user with no business here
    postgres = track(EmbeddedPostgres(data_dir / "pg", durable=False))
    valkey = track(EmbeddedRedis(data_dir / "redis", durable=True))
    postgres.start()
    valkey.start()
    secrets = [postgres.password_path, postgres.log_path, valkey.password_path, valkey.log_path]
    # Let the intruder search the data directories (never done by the stores), so that what stops it
    # below is the mode of each file, not just that of the directory above.
    dirs = [data_dir, data_dir / "pg", data_dir / "redis"]
    modes = {path: path.stat().st_mode for path in dirs}
    for path in dirs:
        os.chmod(path, 0o711)
    try:
        code, stdout, stderr = run_as(intruder, INTRUDER, [
            str(postgres.port), str(valkey.port),
            *map(str, [*secrets, data_dir / "redis", postgres.pgdata])])
    finally:
        for path, mode in modes.items():
            os.chmod(path, stat.S_IMODE(mode))
    assert code == 0, stderr
    report = json.loads(stdout)
    for path in [*secrets, data_dir / "redis", postgres.pgdata]:
        assert report[str(path)] == "PermissionError", (path, report[str(path)][:80])
    assert report["pg"] == ["R", 10]  # AuthenticationSASL: the password is required
    assert report["redis"].startswith("-NOAUTH")


# ------------------------------------------------------------------------------------------------
# Valkey


def test_valkey_refuses_clients_without_the_password(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedRedis(data_dir / "redis", durable=False))
    url = server.start()
    password = (data_dir / "redis" / "valkey.password").read_text()
    assert url == f"redis://:{password}@127.0.0.1:{server.port}/0" and len(password) >= 40

    # RESP2, so that the server's own refusal comes back (under RESP3 redis-py's HELLO is refused
    # first); no retries, which would only repeat it with backoff.
    def client(**kwargs: Any) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=5, retry=Retry(NoBackoff(), 0),
                           protocol=2, **kwargs)

    with pytest.raises(redis.AuthenticationError, match="Authentication required"):  # NOAUTH
        client().get("k")
    with pytest.raises(redis.AuthenticationError, match="invalid username-password"):  # WRONGPASS
        client(password="wrong-" + password).ping()
    assert client(password=password).ping()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
        assert raw.recv(100).startswith(b"-NOAUTH")

    authed = redis.Redis.from_url(url, socket_timeout=5)
    assert authed.ping()
    config = cast(dict[str, str], authed.config_get("*"))
    assert config["protected-mode"] == "yes"
    assert config["bind"] == "127.0.0.1"
    assert config["requirepass"] == password
    assert password not in cmdline(server.pid)
    server.stop()
    assert password not in server.log_path.read_text()


def test_valkey_files_are_private_and_restart_keeps_the_password(
    data_dir: Path, track: Any
) -> None:
    server = track(EmbeddedRedis(data_dir / "redis", durable=True))
    url = server.start()
    client = redis.Redis.from_url(url, socket_timeout=5)
    client.set("sku:{SKU-1}", "42")
    client.bgrewriteaof()  # AOF files made by a rewrite (a fork of the server) are private too
    assert client.execute_command("WAITAOF", 1, 0, 5000)[0] == 1  # type: ignore[no-untyped-call]
    server.stop()

    aof = data_dir / "redis" / "appendonlydir"
    assert aof.is_dir() and list(aof.iterdir())
    for path in [data_dir / "redis", aof]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for name in ("valkey.password", "valkey.log"):
        assert stat.S_IMODE((data_dir / "redis" / name).stat().st_mode) == 0o600, name
    assert open_modes(data_dir / "redis") == []

    again = track(EmbeddedRedis(data_dir / "redis", server.port, durable=True))
    assert again.start() == url
    assert redis.Redis.from_url(url, socket_timeout=5).get("sku:{SKU-1}") == b"42"
    again.stop()


def test_valkey_tightens_the_files_of_an_older_version(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedRedis(data_dir / "redis", durable=True))
    redis.Redis.from_url(server.start(), socket_timeout=5).set("k", "v")
    server.stop()
    # What the old umask-022 version left behind, and no password file.
    (data_dir / "redis" / "valkey.password").unlink()
    for path in [data_dir / "redis", *(data_dir / "redis").rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)

    url = server.start()
    assert redis.Redis.from_url(url, socket_timeout=5).get("k") == b"v"
    server.stop()
    assert open_modes(data_dir / "redis") == []


# ------------------------------------------------------------------------------------------------
# redaction of store URLs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:s3cr3t@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql://postgres:pw@127.0.0.1:5432/inventory",
         "postgresql://postgres:***@127.0.0.1:5432/inventory"),
        ("rediss://user:p%40ss@h:1", "rediss://user:***@h:1"),
        # a password written with a raw '@' or '/' in it
        ("postgres://u:p@ss/w@rd@db.example:5432/x?sslmode=require",
         "postgres://u:***@db.example:5432/x?sslmode=require"),
        ("redis://:a@h1:1/0,redis://:b@h2:2/0", "redis://:***@h1:1/0,redis://:***@h2:2/0"),
        ("connect failed: 'postgresql://u:pw@h/db' (timeout)",
         "connect failed: 'postgresql://u:***@h/db' (timeout)"),
        ("INVENTORY_REDIS_URL=redis://:x-y_z@127.0.0.1:1/0 is bad",
         "INVENTORY_REDIS_URL=redis://:***@127.0.0.1:1/0 is bad"),
        # the embedded stores' Unix socket URLs (local_url)
        ("unix://:s3cr3t@/tmp/inv/redis/valkey.sock?db=0", "unix://:***@/tmp/inv/redis/valkey.sock?db=0"),
        ("postgresql://postgres:pw@/inventory?host=/var/lib/inventory-pg/c1&port=5432",
         "postgresql://postgres:***@/inventory?host=/var/lib/inventory-pg/c1&port=5432"),
        # nothing to hide
        ("postgresql://postgres@127.0.0.1:5432/db", "postgresql://postgres@127.0.0.1:5432/db"),
        ("redis://127.0.0.1:6379/0 and mail me at a:b@c",
         "redis://127.0.0.1:6379/0 and mail me at a:b@c"),
        # ambiguous: hide too much rather than too little
        ("postgresql://u:pw@h/db?note=a@b", "postgresql://u:***@b"),
        ("no url here", "no url here"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redacting_filter_covers_message_args_and_traceback() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("tests.security.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("redis at %s, db at %r", "redis://:one@h:1/0", "postgresql://u:two@h/db")
        logger.warning("inline postgresql://u:three@h/db")
        try:
            raise ConnectionError("cannot reach redis://:four@h:1/0")
        except ConnectionError:
            logger.exception("store down")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    for secret in ("one", "two", "three", "four"):
        assert f":{secret}@" not in text
    assert "redis://:***@h:1/0" in records[0] and "'postgresql://u:***@h/db'" in records[0]
    assert "inline postgresql://u:***@h/db" in records[1]
    assert "ConnectionError: cannot reach redis://:***@h:1/0" in records[2]
