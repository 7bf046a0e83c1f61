"""Service CPU per call, ours against the Postgres-only peer, in alternating rounds: a quick A/B.

    python -m benchmarks.cpu_per_call   (env: WHAT=reserve|loser|avail|cart, C=32 callers, T=8 s a
                                         round, ROUNDS=3, SKUS=300, KEYS=1, PROFILE=file.raw,
                                         PERF=perf.data [PERF_WHO=ours|peer, PERF_ARGS=-F 999],
                                         SYSCALLS=file [PERF_WHO], THREADS=1, PGCPU=1, PGSS=1,
                                         STORES_TCP=1: both reach the stores over TCP
                                         loopback, not the Unix sockets of the embedded default)

Starts the harness's stack (embedded stores, our service with INVENTORY_WORKERS as set, the peer
with one process) on a small demo, and measures the CPU seconds of each service process (and its
children, the stores excepted) over a fixed-time closed loop. WHAT=loser reserves more than a SKU
holds (every call a flash sale's loser); WHAT=cart a keyed Reserve, then its Commit or Release
(half each; figures per call, two calls a cart). PROFILE records our service with py-spy in round 2, PERF
the one named by PERF_WHO with `perf record -g` (PERF_ARGS: what it samples, e.g.
`-e syscalls:sys_enter_getpid` for who makes a system call), SYSCALLS counts that one's system
calls by thread and kind (`perf trace -s`).

Where the CPU goes, per call, after each round: THREADS=1 the service's threads (the serving
loop, grpc's, the WatchStock sequencer's; of its first process, so run it with one worker);
PGCPU=1 Postgres' processes by what they serve (the client backends of each database, the
sequencer's connection, the WAL writer); PGSS=1 (Postgres started with pg_stat_statements) our
database's statements by time, and their planning time.
"""

import asyncio
import contextlib
import os
import random
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psutil

from benchmarks.load import stack
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as g

SKUS = int(os.environ.get("SKUS", "300"))
C = int(os.environ.get("C", "32"))
T = float(os.environ.get("T", "8"))
WHAT = os.environ.get("WHAT", "reserve")


def threads(pid):
    """CPU seconds of each thread of a process, by thread id and its OS name."""
    out = {}
    for t in psutil.Process(pid).threads():
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
            out[f"{t.id}:{name}"] = t.user_time + t.system_time
    return out


PGSS_SETTINGS = ("shared_preload_libraries=pg_stat_statements", "pg_stat_statements.track=all",
                 "pg_stat_statements.track_planning=on")


async def pgss_reset(url):
    """Start counting our database's statements afresh."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def pgss_top(url):
    """Our database's statements since pgss_reset (calls, ms executing, ms planning, text), the
    most time first."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT calls, total_exec_time AS ms, total_plan_time AS pms,"
            " left(regexp_replace(query, '\\s+', ' ', 'g'), 110) AS q"
            " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = 'inventory' ORDER BY total_exec_time + total_plan_time DESC LIMIT 14")
    finally:
        await conn.close()


async def pg_roles(url):
    """Each Postgres process's pid and what it serves ("client backend @inventory", ...)."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pid, coalesce(nullif(application_name, ''), backend_type) AS who,"
            " coalesce(datname, '-') AS db FROM pg_stat_activity")
    finally:
        await conn.close()
    return [(r["pid"], f"{r['who']} @{r['db']}") for r in rows]


def pg_cpu(url):
    """CPU seconds of each Postgres process, keyed (pid, what it serves)."""
    out = {}
    for pid, role in asyncio.run(pg_roles(url)):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            out[(pid, role)] = t.user + t.system
    return out


def profiler(name, pid):
    """The profiler that PROFILE (py-spy, ours) or PERF (perf, PERF_WHO) asks for on `name`'s
    service, recording for the round's length; None when none is asked for."""
    import subprocess

    if os.environ.get("PROFILE") and name == "ours":
        cmd = ["py-spy", "record", "-p", str(pid), "--duration", str(int(T) - 1), "--rate", "250",
               "--format", "raw", "-o", os.environ["PROFILE"]]
    elif os.environ.get("SYSCALLS") and name == os.environ.get("PERF_WHO", "ours"):
        cmd = ["perf", "trace", "-s", "-p", str(pid), "-o", os.environ["SYSCALLS"], "--",
               "sleep", str(int(T) - 1)]
    elif os.environ.get("PERF") and name == os.environ.get("PERF_WHO", "ours"):
        cmd = ["perf", "record", *os.environ.get("PERF_ARGS", "-F 999").split(), "-g",
               "-p", str(pid), "-o", os.environ["PERF"], "--", "sleep", str(int(T) - 1)]
    else:
        return None
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def show(prefix, seconds, n):
    """CPU ms per call of each part that took more than 10 ms in the round, the most first."""
    for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]):
        if v > 0.01:
            print(f"{prefix}{k:40s} {1000 * v / max(n, 1):.3f} ms/call")


def cpu(pids):
    s = 0.0
    for p in pids:
        try:
            t = psutil.Process(p).cpu_times()
            s += t.user + t.system
            for ch in psutil.Process(p).children(recursive=True):
                if "postgres" in ch.name() or "valkey" in ch.name():
                    continue
                t = ch.cpu_times()
                s += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return s


async def load(target, u, what):
    ch = grpc.aio.insecure_channel(target)
    stub = g.InventoryServiceStub(ch)
    n = 0
    stop = time.monotonic() + T
    rng = random.Random(1)
    skus = sorted(u.sku_locs)

    async def one():
        nonlocal n
        while time.monotonic() < stop:
            sku = rng.choice(skus)
            if what == "loser":
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Reserve(
                        api.ReserveRequest(
                            lines=[
                                pb.ReservationLine(
                                    sku=skus[0], location_id=u.sku_locs[skus[0]][0], quantity=10**9
                                )
                            ],
                            idempotency_key=uuid.uuid4().hex if os.environ.get("KEYS", "1") == "1" else "",
                            ttl_seconds=60,
                        )
                    )
            elif what == "reserve":
                loc = rng.choice(u.sku_locs[sku])
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Reserve(
                        api.ReserveRequest(
                            lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=1)],
                            idempotency_key=uuid.uuid4().hex,
                            ttl_seconds=60,
                        )
                    )
            elif what == "cart":  # a Reserve, then its Commit or Release: two calls
                loc = rng.choice(u.sku_locs[sku])
                with contextlib.suppress(grpc.aio.AioRpcError):
                    held = await stub.Reserve(api.ReserveRequest(
                        lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=1)],
                        idempotency_key=uuid.uuid4().hex, ttl_seconds=60))
                    rid = held.reservation.id
                    if n % 4 < 2:
                        await stub.CommitReservation(api.CommitReservationRequest(
                            reservation_id=rid, idempotency_key=uuid.uuid4().hex))
                    else:
                        await stub.ReleaseReservation(api.ReleaseReservationRequest(
                            reservation_id=rid, idempotency_key=uuid.uuid4().hex))
                n += 1
            else:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
            n += 1

    await asyncio.gather(*[one() for _ in range(C)])
    await ch.close()
    return n


def main():
    d = Path(tempfile.mkdtemp(prefix="cpub-"))
    st = stack.LocalStack(skus=SKUS, log_dir=d, peer=stack.PeerOptions(),
                          pg_settings=PGSS_SETTINGS if os.environ.get("PGSS") else (),
                          stores_tcp=os.environ.get("STORES_TCP") == "1")
    st.start()
    try:
        u = asyncio.run(stack.discover(st.target, SKUS, locations=20, seed=1))
        from inventory_svc.demo import load_demo

        asyncio.run(load_demo(st.peer_target, sku_count=SKUS))
        for name, t in (("ours", st.target), ("peer", st.peer_target)):
            asyncio.run(stack.restock(t, u, warehouse_units=10**7, store_units=10**6, key=f"r-{name}"))
        pids = {"ours": [st.service.pid], "peer": [st.peer.pid]}
        res = {"ours": [], "peer": []}
        for rnd in range(int(os.environ.get("ROUNDS", "3"))):
            order = ["ours", "peer"] if rnd % 2 == 0 else ["peer", "ours"]
            for name in order:
                tgt = st.target if name == "ours" else st.peer_target
                c0 = cpu(pids[name])
                if os.environ.get("PGSS") and name == "ours":
                    asyncio.run(pgss_reset(st.database_url))
                pg0 = pg_cpu(st.database_url) if os.environ.get("PGCPU") else {}
                th0 = threads(pids[name][0])
                t0 = time.monotonic()
                prof = profiler(name, pids[name][0]) if rnd == 1 else None
                n = asyncio.run(load(tgt, u, WHAT))
                if prof:
                    prof.wait()
                c1 = cpu(pids[name])
                if os.environ.get("PGSS") and name == "ours":
                    for r in asyncio.run(pgss_top(st.database_url)):
                        print(f"   sql {r['calls']:7d} calls  {1000 * r['ms'] / n:7.1f} us/call"
                              f" + planning {1000 * r['pms'] / n:6.1f}  {r['q']}")
                if os.environ.get("PGCPU"):
                    by_role: dict[str, float] = {}
                    for (pid, role), v in pg_cpu(st.database_url).items():
                        by_role[role] = by_role.get(role, 0.0) + v - pg0.get((pid, role), 0.0)
                    show("   postgres ", by_role, n)
                if os.environ.get("THREADS"):
                    th1 = threads(pids[name][0])
                    show("   thread ", {k: v - th0.get(k, 0.0) for k, v in th1.items()}, n)
                el = time.monotonic() - t0
                res[name].append((n / el, 1000 * (c1 - c0) / n))
                print(f"{name}: {n / el:7.0f}/s  {1000 * (c1 - c0) / n:.3f} ms CPU/call", flush=True)
        for name, r in res.items():
            r.sort(key=lambda x: x[1])
            print(
                name, "median CPU ms/call", r[len(r) // 2][1], "calls/s", sorted(x[0] for x in r)[len(r) // 2]
            )
    finally:
        st.stop()


if __name__ == "__main__":
    main()
