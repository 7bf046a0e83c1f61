"""Embedded Valkey and PostgreSQL: real processes, real data directories, no mocks."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from inventory_svc.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError
from inventory_svc.embedded.cluster import EmbeddedRedisCluster

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Linux /proc and prctl"
)

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 15.0



def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Poll condition until it holds or the deadline passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return condition()
        time.sleep(0.01)
    return True


def alive(pid: int) -> bool:
    """A live process (a zombie is dead: it holds no port, memory or shared memory)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def pg(url: str, sql: str, *args: Any) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def rds(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)




# ------------------------------------------------------------------------------------------------
# Valkey


def test_redis_start_stop_restart_keeps_data(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedRedis(data_dir / "redis"))
    url = server.start()
    port = server.port
    assert url == f"redis://:{server.password}@127.0.0.1:{port}/0" == server.url
    assert server.running and server.pid is not None
    assert server.start() == url  # idempotent
    rds(url).set("sku:{SKU-1}", "42")

    pid = server.pid
    server.stop()
    assert not server.running and server.pid is None
    assert not alive(pid)
    assert (data_dir / "redis" / "appendonlydir").is_dir()
    assert (data_dir / "redis" / "valkey.log").is_file()

    assert server.start() == url
    assert rds(url).get("sku:{SKU-1}") == b"42"
    first = server.pid
    assert server.restart() == url and server.port == port
    assert server.pid != first and not alive(first)
    assert rds(url).get("sku:{SKU-1}") == b"42"
    server.stop()


def test_redis_not_durable_keeps_nothing(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedRedis(data_dir, durable=False))
    rds(server.start()).set("k", "v")
    server.restart()
    assert rds(server.url).get("k") is None
    assert not (data_dir / "appendonlydir").exists()
    assert not list(data_dir.glob("*.rdb"))
    server.stop()


def test_redis_kill_then_restart_keeps_fsynced_writes(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedRedis(data_dir))
    client = rds(server.start())
    client.set("k", "before-crash")
    # WAITAOF 1 0: returns once the write is fsynced to the local AOF (numlocal=1).
    assert client.execute_command("WAITAOF", 1, 0, 5000)[0] == 1  # type: ignore[no-untyped-call]
    pid = server.pid
    server.kill()
    assert not server.running and not alive(pid)
    server.restart()
    assert rds(server.url).get("k") == b"before-crash"
    server.stop()


def test_redis_context_manager_and_fixed_port(data_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with EmbeddedRedis(data_dir, port, durable=False) as server:
        assert server.port == port
        assert server.url == f"redis://:{server.password}@127.0.0.1:{port}/0"
        assert rds(server.url).ping()
        pid = server.pid
        assert pid is not None
    assert not server.running and not alive(pid)


def test_a_new_cluster_node_whose_port_was_taken_meanwhile_starts_on_others(
        data_dir: Path) -> None:
    """A port is chosen free, then bound by the server: another process may take it in between
    (seen on a busy box). A node of a cluster not formed yet moves to other ports."""
    cluster = EmbeddedRedisCluster(data_dir / "cluster", masters=3)
    node = cluster.nodes[0]
    taken = node.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            cluster.start()
            assert node.port != taken
            with node.client() as c:
                assert c.cluster("INFO")["cluster_state"] == "ok"
        finally:
            cluster.kill()


def test_redis_start_failure_is_a_clear_error(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedRedis(data_dir, taken.getsockname()[1], durable=False)
        with pytest.raises(EmbeddedServerError, match="Address already in use") as info:
            server.start()
        assert "valkey.log" in str(info.value)
        assert not server.running and server.pid is None


def test_server_started_from_a_short_lived_thread_survives_it(data_dir: Path, track: Any) -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits; the server must outlive this one.
    server = track(EmbeddedRedis(data_dir, durable=False))
    thread_ids: list[int] = []

    def start() -> None:
        thread_ids.append(threading.get_native_id())
        server.start()

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert wait_until(lambda: not Path(f"/proc/self/task/{thread_ids[0]}").exists())
    assert server.running
    assert rds(server.url).ping()
    server.stop()


# ------------------------------------------------------------------------------------------------
# PostgreSQL


def test_postgres_start_stop_restart_keeps_rows(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedPostgres(data_dir / "pg", durable=False))
    url = server.start()
    assert url == server.url
    assert url == f"postgresql://postgres:{server.password}@127.0.0.1:{server.port}/inventory"
    assert (data_dir / "pg" / "pgdata" / "PG_VERSION").is_file()
    assert server.start() == url
    pg(url, "CREATE TABLE stock (sku text PRIMARY KEY, on_hand int NOT NULL)")
    pg(url, "INSERT INTO stock VALUES ($1, $2)", "SKU-000001", 7)

    pid = server.pid
    assert pid is not None
    backends = children(pid)
    assert backends  # checkpointer, walwriter, ... are children of the postmaster
    server.stop()
    assert not server.running and server.pid is None
    assert not alive(pid) and not any(alive(child) for child in backends)

    server.start()
    assert pg(url, "SELECT on_hand FROM stock")[0]["on_hand"] == 7
    first = server.pid
    assert server.restart() == url
    assert server.pid != first
    assert pg(url, "SELECT count(*) AS n FROM stock")[0]["n"] == 1
    server.stop()


def test_postgres_kill_then_restart_with_stale_postmaster_pid(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedPostgres(data_dir, durable=True))
    url = server.start()
    pg(url, "CREATE TABLE t (x int)")
    pg(url, "INSERT INTO t VALUES (1)")
    pid = server.pid
    assert pid is not None
    backends = children(pid)
    server.kill()
    assert not alive(pid) and not any(alive(child) for child in backends)
    assert (server.pgdata / "postmaster.pid").is_file()  # left behind by the crash

    server.restart()  # crash recovery from WAL
    assert pg(url, "SELECT x FROM t")[0]["x"] == 1

    # A stale lock whose pid now belongs to an unrelated live process (pid reuse after a crash in
    # a container): postgres alone would refuse to start.
    server.kill()
    lock = server.pgdata / "postmaster.pid"
    lines = lock.read_text().split("\n")
    lock.write_text("\n".join(["1", *lines[1:]]))
    server.start()
    assert pg(url, "SELECT x FROM t")[0]["x"] == 1
    server.stop()


def test_postgres_creates_the_named_database(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedPostgres(data_dir, durable=False, database="orders db"))
    # other servers (the suite's session stores) may be our children too: only new ones count
    before = set(children(os.getpid()))
    # A start that misses its deadline fails clearly and leaves nothing running (initdb, which
    # runs before the deadline starts, is kept).
    with pytest.raises(EmbeddedServerError, match="did not become ready") as info:
        server.start(timeout=0)
    assert "postgres.log" in str(info.value)
    assert not server.running and server.pid is None
    assert not [pid for pid in set(children(os.getpid())) - before if "postgres" in _comm(pid)]
    url = server.start()
    assert url.endswith("/orders%20db")
    assert pg(url, "SELECT current_database() AS db")[0]["db"] == "orders db"
    names = [row["datname"] for row in pg(url, "SELECT datname FROM pg_database")]
    assert "orders db" in names
    server.stop()


def test_postgres_runs_unprivileged(data_dir: Path, track: Any) -> None:
    server = track(EmbeddedPostgres(data_dir, durable=False))
    server.start()
    status = Path(f"/proc/{server.pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    if os.geteuid() == 0:
        assert uid != "0"
    assert pg(server.url, "SHOW fsync")[0]["fsync"] == "off"
    assert pg(server.url, "SHOW max_connections")[0]["max_connections"] == "200"
    server.stop()


# ------------------------------------------------------------------------------------------------
# no orphans when the owning process dies or exits without stop()

CHILD_SCRIPT = """
import json, sys
from pathlib import Path
from inventory_svc.embedded import EmbeddedPostgres, EmbeddedRedis
base = Path(sys.argv[1])
r = EmbeddedRedis(base / "redis", durable=False)
r.start()
p = EmbeddedPostgres(base / "pg", durable=False)
p.start()
print(json.dumps({"redis": r.pid, "postgres": p.pid}), flush=True)
if sys.argv[2] == "hang":
    sys.stdin.read()
"""


def _run_owner(data_dir: Path, mode: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(data_dir), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert owner.stdout is not None
    ready, _, _ = select.select([owner.stdout], [], [], 60)
    if not ready:
        owner.kill()
        owner.wait()
        pytest.fail("the owner process did not start its servers within 60 s")
    return owner, json.loads(owner.stdout.readline())


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_children_die_when_owner_is_sigkilled(data_dir: Path) -> None:
    owner, pids = _run_owner(data_dir, "hang")
    watched = [pids["redis"], pids["postgres"], *children(pids["postgres"])]
    try:
        assert all(alive(pid) for pid in watched[:2])
        owner.kill()  # SIGKILL: no atexit, no finalizers -- only PR_SET_PDEATHSIG can help
        owner.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in watched))
    finally:
        _kill_leftovers(watched)


def test_children_stopped_when_owner_exits_without_stop(data_dir: Path) -> None:
    owner, pids = _run_owner(data_dir, "exit")
    watched = [pids["redis"], pids["postgres"], *children(pids["postgres"])]
    try:
        assert owner.wait(DEADLINE) == 0
        # The exit-time finalizer stopped them gracefully and waited, before the owner exited.
        assert not alive(pids["redis"]) and not alive(pids["postgres"])
        assert wait_until(lambda: not any(alive(pid) for pid in watched))
        log = (data_dir / "pg" / "postgres.log").read_text()
        assert "received fast shutdown request" in log
    finally:
        _kill_leftovers(watched)
