"""`serve --workers N`: N processes on one port, one of them elected to run the background work
(sweeper, reconciler) through a Postgres advisory lock, taken over when it dies; and the
cgroup-aware CPU count that is the default N."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import psutil
import pytest

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.app.background import lead, leader_lock
from inventory_svc.config import ConfigError, Settings
from inventory_svc.cpus import cgroup_cpu_quota, usable_cpus
from inventory_svc.workers import leader_group
from tests.conftest import Stores, settings_for, uid
from tests.faults.harness import REPO, ServiceProcess, eventually, make_world, own_site

# ---- the default worker count: affinity capped by the cgroup CPU quota ---------------------------


def fake_proc(tmp: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """/proc/self with `cgroup` and one mountinfo line per (root, mount point, fstype, super
    options)."""
    proc = tmp / "proc-self"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(
        f"{30 + i} 23 0:{40 + i} {root} {point} rw,nosuid,nodev,noexec,relatime - {fstype} "
        f"{fstype} {opts}\n" for i, (root, point, fstype, opts) in enumerate(mounts)))
    return proc


def write(path: Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for line in text.split(";"):
        name, _, value = line.partition("=")
        (path / name).write_text(value + "\n")


def test_cgroup_v2_quota_in_a_namespace_rounds_up(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    write(cg, "cpu.max=150000 100000")
    proc = fake_proc(tmp_path, "0::/\n", [("/", str(cg), "cgroup2", "rw,nsdelegate")])
    assert cgroup_cpu_quota(proc) == 1.5
    assert usable_cpus(proc, affinity=8) == 2
    assert usable_cpus(proc, affinity=1) == 1  # the affinity mask is the tighter one


def test_cgroup_v2_the_tightest_ancestor_counts(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    write(cg / "kubepods.slice", "cpu.max=max 100000")
    write(cg / "kubepods.slice" / "pod1", "cpu.max=300000 100000")
    write(cg / "kubepods.slice" / "pod1" / "ctr", "cpu.max=max 100000")
    proc = fake_proc(tmp_path, "0::/kubepods.slice/pod1/ctr\n",
                     [("/", str(cg), "cgroup2", "rw")])
    assert usable_cpus(proc, affinity=64) == 3


def test_cgroup_v2_unlimited_leaves_the_affinity(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    write(cg, "cpu.max=max 100000")
    proc = fake_proc(tmp_path, "0::/\n", [("/", str(cg), "cgroup2", "rw")])
    assert cgroup_cpu_quota(proc) is None
    assert usable_cpus(proc, affinity=6) == 6


def test_cgroup_v1_cfs_quota_with_a_host_path_under_the_mount_root(tmp_path: Path) -> None:
    # a container without its own cgroup namespace: it sees the host path, the mount shows the
    # part below the mount's root (and the mount point has a space, escaped in mountinfo)
    cg = tmp_path / "cpu cpuacct"
    write(cg, "cpu.cfs_quota_us=50000;cpu.cfs_period_us=100000")
    proc = fake_proc(
        tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        [("/docker/abc", str(cg).replace(" ", "\\040"), "cgroup", "rw,cpu,cpuacct"),
         ("/docker/abc", str(tmp_path / "memory"), "cgroup", "rw,memory")])
    assert cgroup_cpu_quota(proc) == 0.5
    assert usable_cpus(proc, affinity=16) == 1  # never 0


def test_cgroup_v1_unlimited_and_hybrid_take_the_minimum(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "cpu", tmp_path / "unified"
    write(v1, "cpu.cfs_quota_us=-1;cpu.cfs_period_us=100000")
    write(v1 / "svc", "cpu.cfs_quota_us=400000;cpu.cfs_period_us=100000")
    write(v2 / "svc", "cpu.max=250000 100000")
    proc = fake_proc(tmp_path, "3:cpu,cpuacct:/svc\n0::/svc\n",
                     [("/", str(v1), "cgroup", "rw,cpuacct,cpu"),
                      ("/", str(v2), "cgroup2", "rw")])
    assert cgroup_cpu_quota(proc) == 2.5
    assert usable_cpus(proc, affinity=32) == 3


def test_no_cgroup_files_means_the_affinity(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path / "nothing") is None
    assert usable_cpus(tmp_path / "nothing", affinity=5) == 5
    assert usable_cpus() >= 1  # this machine, for real


def test_workers_setting() -> None:
    assert Settings.from_env({"INVENTORY_WORKERS": "3"}).workers == 3
    assert Settings.from_env({}).workers == 0  # auto
    with pytest.raises(ConfigError, match="INVENTORY_WORKERS=-1"):
        Settings.from_env({"INVENTORY_WORKERS": "-1"})


# ---- the leader's lock -----------------------------------------------------------------------


async def lock_holders(conn: asyncpg.Connection, key: int) -> list[tuple[int, str]]:
    """(backend pid, application_name) of the sessions holding advisory lock `key`."""
    rows = await conn.fetch(
        "SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::bigint::oid"
        " AND l.objid = $2::bigint::oid AND l.objsubid = 1",
        (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)
    return [(r["pid"], r["application_name"]) for r in rows]


async def test_a_leader_that_loses_its_lock_connection_stops_and_another_leads(
        stores: Stores) -> None:
    settings = settings_for(stores)
    key = leader_lock(uid("group"))
    running: set[str] = set()
    stopped: list[str] = []

    def work_of(name: str) -> Callable[[], Awaitable[None]]:
        async def work() -> None:
            running.add(name)
            try:
                await asyncio.Event().wait()
            finally:
                running.discard(name)
                stopped.append(name)
        return work

    tasks = [asyncio.create_task(lead(settings, key, work_of(n), retry_s=0.2)) for n in "ab"]
    conn = await asyncpg.connect(stores.database_url)
    try:
        async def one_leads() -> bool:
            return len(running) == 1 and len(await lock_holders(conn, key)) == 1

        await eventually(one_leads, within=30, what="one leader")
        (first,) = running
        (backend, _), = await lock_holders(conn, key)
        # its session ends (as when the worker's connection breaks): its work must stop
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", backend)

        async def first_stopped() -> bool:
            return first in stopped

        await eventually(first_stopped, within=30, what="the old leader stopping its work")

        async def led_again() -> bool:
            holders = await lock_holders(conn, key)
            return len(running) == 1 and len(holders) == 1 and holders[0][0] != backend

        await eventually(led_again, within=30, what="a new leader")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async def released() -> bool:
            return not await lock_holders(conn, key)
        await eventually(released, within=30, what="the lock let go at cancellation")
        await conn.close()
    assert not running


# ---- the real thing: a supervisor and two workers --------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_channel(target: str) -> grpc.aio.Channel:
    # gRPC shares one connection among channels to the same target unless told not to
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def established_on(pid: int, port: int) -> int:
    try:
        conns = psutil.Process(pid).net_connections("tcp")
    except psutil.NoSuchProcess:
        return 0
    return sum(1 for c in conns if c.laddr and c.laddr.port == port
               and c.status == psutil.CONN_ESTABLISHED)


async def test_two_workers_one_port_one_leader_takeover_and_clean_stop(stores: Stores) -> None:
    async with own_site(stores) as site:
        metrics_port = free_port()
        svc = ServiceProcess(site.redis_url, site.database_url, site.root, workers=2,
                             metrics_port=metrics_port)
        await asyncio.to_thread(svc.start)
        assert svc.proc is not None
        channels: list[grpc.aio.Channel] = []
        conn = await asyncpg.connect(site.database_url)
        try:
            workers = svc.workers()
            assert sorted(workers) == [0, 1], svc.log_tail()
            children = {p.pid for p in psutil.Process(svc.proc.pid).children()}
            assert children == set(workers.values())  # URLs given: no embedded stores

            # both processes serve the one port: fresh connections are spread over them
            channels.append(fresh_channel(svc.target))
            stub = api_grpc.InventoryServiceStub(channels[0])
            w = await make_world(stub, locations=1, skus=1, on_hand=100)
            sku, loc = w.skus[0], w.locations[0]

            async def both_serve() -> bool:
                ch = fresh_channel(svc.target)
                channels.append(ch)
                got = await api_grpc.InventoryServiceStub(ch).GetAvailability(
                    api.GetAvailabilityRequest(skus=[sku], location_ids=[loc]), timeout=10)
                assert got.items[0].total_on_hand == 100
                return all(established_on(pid, svc.port) for pid in workers.values())

            await eventually(both_serve, within=60, what="connections served by both workers")
            # one metrics endpoint (the supervisor's) counts the calls of both
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode())
            reads = [line for line in text.splitlines() if line.startswith(
                'inventory_rpc_total{code="OK",method="GetAvailability"}')]
            assert reads and float(reads[0].split()[-1]) == len(channels) - 1, reads

            # exactly one of them leads the background work, on its own session
            key = leader_lock(leader_group(svc.proc.pid))
            leader = 0

            async def one_leads() -> bool:
                nonlocal leader
                holders = await lock_holders(conn, key)
                assert len(holders) == 1, holders
                leader = int(holders[0][1].rsplit(" ", 1)[1])
                return True

            await eventually(one_leads, within=30, what="one leader")
            assert leader in workers.values()

            # the leader dies: another worker takes the lock, the sweeper runs again there
            os.kill(leader, signal.SIGKILL)
            key_of_call, res_id = uid("k"), ""

            async def reserved() -> bool:  # a call cut by the kill is asked again
                nonlocal res_id
                try:
                    out = await stub.Reserve(api.ReserveRequest(
                        lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=1)],
                        ttl_seconds=1, idempotency_key=key_of_call), timeout=10)
                except grpc.aio.AioRpcError as err:
                    if err.code() is not grpc.StatusCode.UNAVAILABLE:
                        raise
                    return False
                res_id = out.reservation.id
                return True

            await eventually(reserved, within=30, what="a reservation after the kill")

            async def taken_over() -> bool:
                holders = await lock_holders(conn, key)
                assert len(holders) == 1, holders
                pid = int(holders[0][1].rsplit(" ", 1)[1])
                return pid != leader and psutil.pid_exists(pid)

            await eventually(taken_over, within=30, what="another worker leading")

            async def expired() -> bool:
                got = await stub.GetReservation(
                    api.GetReservationRequest(reservation_id=res_id), timeout=10)
                return got.reservation.status == pb.RESERVATION_STATUS_EXPIRED

            await eventually(expired, within=30, what="the 1 s reservation expired")

            # the supervisor started the dead worker again
            async def restarted() -> bool:
                now = svc.workers()
                return len(now) == 2 and leader not in now.values()

            await eventually(restarted, within=60, what="the dead worker restarted")
            workers = svc.workers()

            svc.terminate()  # SIGTERM: every worker drains and exits, then the supervisor
            assert await asyncio.to_thread(svc.wait, 60) == 0, svc.log_tail()
            procs = [psutil.Process(p) for p in workers.values() if psutil.pid_exists(p)]
            _, alive = await asyncio.to_thread(psutil.wait_procs, procs, 30)
            assert not alive, f"workers outlived the supervisor: {alive}"
        finally:
            for ch in channels:
                await ch.close()
            await conn.close()
            svc.kill()


def start_serving(args: list[str], env: dict[str, str],
                  lines: list[str]) -> tuple[subprocess.Popen[str], int]:
    """Start `inventory-svc ARGS`; return once the supervisor says it serves (and its port).
    Its output keeps being collected into `lines`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "inventory_svc.cli", *args], env=env, cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "serving gRPC on" in line:
            threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
            return proc, int(line.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1])
    raise AssertionError(f"exited {proc.wait()}:\n{''.join(lines[-40:])}")


async def test_embedded_stores_and_the_demo_once_for_all_workers() -> None:
    # outside pytest's basetemp (see conftest): the postgres user must reach the data dir
    root = Path(tempfile.mkdtemp(prefix="inventory-test-workers-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    # (no overload shedding: a busy CI box's late loop is not what this test is about)
    env.update(INVENTORY_DEMO_SKUS="200", INVENTORY_QUEUE_BUDGET_MS="0", PYTHONPATH=str(REPO))
    lines: list[str] = []
    channels: list[grpc.aio.Channel] = []
    children: list[psutil.Process] = []
    proc: subprocess.Popen[str] | None = None
    try:
        proc, port = await asyncio.to_thread(start_serving, [
            "serve", "--workers", "2", "--port", "0", "--data-dir", str(root / "data"),
            "--demo"], env, lines)
        children = psutil.Process(proc.pid).children()
        names = sorted(Path(p.cmdline()[0]).name.split()[0] for p in children)  # valkey: a title
        # the stores once, by the supervisor; the workers start none of their own
        assert names == ["postgres", "python", "python", "valkey-server"], names
        workers = [p for p in children if Path(p.cmdline()[0]).name == "python"]
        # (a worker's only child may be a routing kernel compile, on a machine without them)
        assert not [c for w in workers for c in w.children()
                    if "routing.warm" not in " ".join(c.cmdline())]
        # worker 0 loads the demo before it serves, the others start after it
        loading = [x for x in lines if "demo: loading" in x]
        assert len(loading) == 1 and "[worker 0 pid " in loading[0], "".join(lines)

        async def both_see_the_demo() -> bool:
            ch = fresh_channel(f"127.0.0.1:{port}")
            channels.append(ch)
            got = await api_grpc.InventoryServiceStub(ch).GetAvailability(
                api.GetAvailabilityRequest(skus=["SKU-000001"]), timeout=10)
            assert got.items[0].total_on_hand > 0
            return all(established_on(w.pid, port) for w in workers)

        await eventually(both_see_the_demo, within=60, what="both workers serving the demo")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 30)
        assert not alive, f"orphaned processes: {alive}"
    finally:
        for ch in channels:
            await ch.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
        for child in children:
            if child.is_running():
                child.kill()
        shutil.rmtree(root, ignore_errors=True)
