"""What a start looks like from outside: health per service, refusals while starting, the log.

Inventory is NOT_SERVING (and its calls UNAVAILABLE + RetryInfo) until Redis is checked against
Postgres and `prepare` (the demo load) ran; the RoutingService is NOT_SERVING until its kernels
are in, compiled by a child process the service owns. Expected rebuilds log INFO, a Redis that
loses its data while serving WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numba.core.caching import _CacheLocator

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.app.background import Reconciler, ReconcileReport
from inventory_svc.cli import _demo_loader
from inventory_svc.demo import demo_wanted
from inventory_svc.server import INVENTORY, ROUTING, Running, serve
from routing.warm import ROUTING_DIR
from tests.conftest import Stores, settings_for, store_location, uid
from tests.faults.harness import REPO, ServiceProcess, eventually, own_site, site_settings
from tests.grpc_helpers import details, expect_error

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def statuses(port: int) -> dict[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return {name: (await stub.Check(health_pb2.HealthCheckRequest(service=name),
                                        timeout=30)).status for name in ("", INVENTORY, ROUTING)}


def retry_after(err: grpc.aio.AioRpcError) -> float:
    (info,) = [d for d in details(err) if isinstance(d, error_details_pb2.RetryInfo)]
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


async def refused_while_starting(port: int) -> float:
    """An inventory call is answered UNAVAILABLE with when to retry; that delay."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        err = await expect_error(api_grpc.InventoryServiceStub(ch).GetAvailability(
            api.GetAvailabilityRequest(skus=["SKU-000001"]), timeout=30),
            grpc.StatusCode.UNAVAILABLE)
    assert "starting" in (err.details() or "")
    return retry_after(err)


async def test_nothing_serves_until_prepared_then_everything_does(stores: Stores) -> None:
    seen: dict[str, object] = {}

    async def prepare(running: Running) -> None:
        seen["health"] = await statuses(running.port)
        seen["retry"] = await refused_while_starting(running.port)

    async with serve(settings_for(stores), prepare=prepare) as running:
        assert seen["health"] == {"": NOT_SERVING, INVENTORY: NOT_SERVING, ROUTING: NOT_SERVING}
        assert float(str(seen["retry"])) >= 1.0
        assert await statuses(running.port) == {"": SERVING, INVENTORY: SERVING,
                                                ROUTING: SERVING}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            await api_grpc.InventoryServiceStub(ch).GetAvailability(
                api.GetAvailabilityRequest(skus=["SKU-000001"]))


async def test_the_demo_loads_before_inventory_serves_and_only_once(
        stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with own_site(stores) as site:
        settings = site_settings(stores, site, demo_skus=30)
        load = _demo_loader(settings)
        seen: dict[str, object] = {}

        async def prepare(running: Running) -> None:
            seen["before"] = await statuses(running.port)
            await load(running)
            seen["after"] = await statuses(running.port)
            seen["retry"] = await refused_while_starting(running.port)

        async with serve(settings, prepare=prepare) as running:
            assert seen["before"] == seen["after"] == {
                "": NOT_SERVING, INVENTORY: NOT_SERVING, ROUTING: NOT_SERVING}
            assert len(running.ctx.locations) == 126
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
                got = await api_grpc.InventoryServiceStub(ch).GetAvailability(
                    api.GetAvailabilityRequest(skus=["SKU-000001", "SKU-000030"]))
            assert all(item.total_on_hand > 0 for item in got.items)
            # a load stopped half-way (the last SKU not in yet) is loaded again at the next start
            wanted, why = await demo_wanted(running.stock, sku_count=40)
            assert wanted and "did not finish" in why
        text = caplog.text
        assert "demo: no locations yet" in text
        assert re.search(r"demo: (\d+) of \1 stock rows loaded", text), text
        caplog.clear()
        async with serve(settings, prepare=load):  # a restart: the demo is there
            pass
        assert "demo: not loading it: the demo network is loaded already" in caplog.text
        assert "demo: loading" not in caplog.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ended(task: asyncio.Task[Any], what: str, within: float = 120.0) -> None:
    """Hang guard: `task` ends (its failure raised here), or the test fails naming `what`,
    instead of hanging to pytest-timeout with the session's event loop."""
    done, _ = await asyncio.wait({task}, timeout=within)
    assert done, f"{what}: still running after {within:g}s"
    task.result()


async def test_redis_rebuilt_at_start_is_not_serving_meanwhile_and_logged_info(
        stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with own_site(stores) as site:
        settings = site_settings(stores, site, redis_timeout_s=120.0)
        sku, loc = uid("SKU"), uid("L")
        async with serve(settings) as running, grpc.aio.insecure_channel(
                f"127.0.0.1:{running.port}") as ch:
            stub = api_grpc.InventoryServiceStub(ch)
            await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[store_location(loc)]))
            await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=7))
        admin = aioredis.Redis.from_url(site.redis_url)
        try:
            await admin.flushall()  # Redis restarted empty while the service was down
            # Every command that may write waits until the test lets it go: the start is held at
            # the first, the run check (an EVAL, checkrun.lua) of its first Redis connection,
            # before it even reads the generation; then come the rebuild's own scripts.
            await admin.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")
            caplog.clear()
            port = free_port()
            entered = asyncio.Event()
            leave = asyncio.Event()

            async def run() -> None:
                async with serve(dataclasses.replace(settings, port=port)):
                    entered.set()
                    await leave.wait()

            task = asyncio.create_task(run())
            try:
                async def not_serving() -> bool:
                    try:
                        return set((await statuses(port)).values()) == {NOT_SERVING}
                    except grpc.aio.AioRpcError:
                        return False  # not listening yet

                await eventually(not_serving, within=120, what="health while rebuilding")
                assert await refused_while_starting(port) > 0
                assert not entered.is_set()
                await admin.execute_command("CLIENT", "UNPAUSE")
                await asyncio.wait_for(entered.wait(), 120)
                assert (await statuses(port))[INVENTORY] == SERVING
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    got = await api_grpc.InventoryServiceStub(ch).GetAvailability(
                        api.GetAvailabilityRequest(skus=[sku]))
                assert got.items[0].total_on_hand == 7
            finally:
                await admin.execute_command("CLIENT", "UNPAUSE")
                leave.set()
                await ended(task, "the service's shutdown")
        finally:
            await admin.aclose()
    records = caplog.records
    assert any("loading it from postgres" in r.getMessage() and r.levelno == logging.INFO
               for r in records)
    assert not [r.getMessage() for r in records
                if r.levelno >= logging.WARNING and r.name.startswith("inventory_svc")]


async def test_a_cancel_a_store_call_hid_does_not_hold_the_shutdown(
        stores: Stores, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11's asyncio.wait_for, which redis-py sends every command through, returns
    instead of raising when the cancel lands in the loop turn in which its inner task finished
    (CPython gh-86296). The reconciler's first pass was under way when a service that had just
    started stopped; it carried on after the shutdown's cancel, then slept out its interval (an
    hour here) with the shutdown waiting for it. The race is one loop turn wide, so the pass
    here hides the cancel the way it does, every time: the stop must still end, cleanly."""
    caplog.set_level(logging.INFO)
    settings = settings_for(stores)
    in_pass = asyncio.Event()
    hidden: list[bool] = []
    run_pass = Reconciler.run_pass

    async def pass_hiding_its_cancel(self: Reconciler) -> ReconcileReport:
        if self.ctx.settings is not settings:  # another service's reconciler
            return await run_pass(self)
        in_pass.set()
        try:
            await asyncio.Event().wait()  # a store call under way when the service stops...
        except asyncio.CancelledError:
            hidden.append(True)  # ...which returns instead of raising
        return ReconcileReport(0, 0, 0, False)

    monkeypatch.setattr(Reconciler, "run_pass", pass_hiding_its_cancel)

    async def run() -> None:
        async with serve(settings):
            await in_pass.wait()

    await ended(asyncio.create_task(run()), "the service's shutdown")
    assert hidden == [True]
    assert not [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("inventory_svc")]


async def test_a_task_that_will_not_stop_is_left_behind_and_the_pools_close_under_it(
        stores: Stores, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A shutdown ends in bounded time whatever a background task does: one that ignores its
    cancel, holding a Postgres connection (which asyncpg's pool close would wait for), is named
    in an ERROR and left behind; the pools close under it."""
    caplog.set_level(logging.INFO)
    settings = settings_for(stores)
    in_pass, let_go = asyncio.Event(), asyncio.Event()
    stuck: list[asyncio.Task[Any]] = []
    run_pass = Reconciler.run_pass

    async def pass_ignoring_cancels(self: Reconciler) -> ReconcileReport:
        if self.ctx.settings is not settings:  # another service's reconciler
            return await run_pass(self)
        task = asyncio.current_task()
        assert task is not None
        stuck.append(task)
        async with self.ctx.pg.pool.acquire():
            in_pass.set()
            while not let_go.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await let_go.wait()
        return ReconcileReport(0, 0, 0, False)

    monkeypatch.setattr(Reconciler, "run_pass", pass_ignoring_cancels)
    seen: list[Running] = []

    async def run() -> None:
        async with serve(settings) as running:
            seen.append(running)
            await in_pass.wait()

    try:
        await ended(asyncio.create_task(run()), "the service's shutdown")
        assert not stuck[0].done()  # still in its pass: left behind
        assert seen[0].ctx.pg.pool.is_closing()
        errors = [r.getMessage() for r in caplog.records
                  if r.levelno >= logging.ERROR and r.name.startswith("inventory_svc")]
        assert any("did not stop when cancelled" in m for m in errors), errors
        assert any("closing the postgres pool did not finish" in m for m in errors), errors
    finally:
        let_go.set()  # the pass ends; the loop then honours the cancel it had
        if stuck:
            done, _ = await asyncio.wait(stuck, timeout=120)
            assert done, "the stuck pass did not end once let go"
    assert stuck[0].cancelled()


async def test_a_restarted_embedded_redis_logs_info_and_a_loss_while_serving_warns(
        stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with own_site(stores, durable_redis=True) as site:
        settings = site_settings(stores, site)
        async with serve(settings):
            pass
        await asyncio.to_thread(site.redis.stop)  # restarted from its append-only file, as
        await asyncio.to_thread(site.redis.start)  # the embedded store is with the service
        caplog.clear()
        async with serve(settings) as running:
            start = list(caplog.records)
            caplog.clear()
            admin = aioredis.Redis.from_url(site.redis_url)
            try:
                await admin.flushall()  # lost while serving
            finally:
                await admin.aclose()
            # rebuilt by this pass or by the background one (they take turns on a lock)
            await running.reconciler.run_pass()
        serving = list(caplog.records)
    assert any("built on another server process" in r.getMessage() and r.levelno == logging.INFO
               for r in start), [r.getMessage() for r in start]
    assert any("loading it from postgres" in r.getMessage() for r in start)
    assert not [r.getMessage() for r in start
                if r.levelno >= logging.WARNING and r.name.startswith("inventory_svc")]
    assert any("lost its data while serving" in r.getMessage() and r.levelno == logging.WARNING
               for r in serving)


# ---- the routing kernels, as the CLI brings them in -------------------------------------------
@contextlib.contextmanager
def compile_held(tmp: Path) -> Iterator[Path]:
    """A directory to be the service's TMPDIR, whose routing warm-up lock this test holds: a
    compile the service starts waits (as behind another process's compile) until the block
    ends."""
    tmp.mkdir()
    fd = os.open(tmp / f"inventory-routing-warm-{os.getuid()}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        os.close(fd)


def cache_missing_one_kernel(root: Path) -> Path:
    """A NUMBA_CACHE_DIR with every routing kernel but one (routing.pool.tol, which compiles in
    a moment): the service must compile, and the compile is quick once it may start."""
    from routing.solver import kernels

    have = Path(kernels().route.stats.cache_path)  # this process loaded (or compiled) them
    cache = root / "numba-cache"
    into = cache / _CacheLocator.get_suitable_cache_subpath(str(ROUTING_DIR / "kernels.py"))
    into.mkdir(parents=True)
    for f in have.iterdir():
        if f.suffix in (".nbi", ".nbc") and not f.name.startswith("pool.tol-"):
            shutil.copy2(f, into / f.name)
    return cache


def warm_children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "routing.warm" in " ".join(p.cmdline())]


async def test_routing_joins_once_its_kernels_are_compiled_inventory_serves_meanwhile(
        stores: Stores, tmp_path: Path) -> None:
    async with own_site(stores) as site:
        svc = ServiceProcess(site.redis_url, site.database_url, site.root, log_level="INFO")
        with compile_held(tmp_path / "tmp") as tmp:
            svc.env.update(NUMBA_CACHE_DIR=str(cache_missing_one_kernel(tmp_path)),
                           TMPDIR=str(tmp))
            await asyncio.to_thread(svc.start)
            try:
                assert await statuses(svc.port) == {"": SERVING, INVENTORY: SERVING,
                                                    ROUTING: NOT_SERVING}

                async def compiling() -> list[psutil.Process]:
                    return warm_children(svc.proc.pid)  # type: ignore[union-attr]

                await eventually(compiling, within=120, what="the compile child started")
                async with grpc.aio.insecure_channel(svc.target) as ch:
                    stub = api_grpc.InventoryServiceStub(ch)
                    loc, sku = uid("L"), uid("SKU")
                    await stub.UpsertLocations(api.UpsertLocationsRequest(
                        locations=[store_location(loc)]))
                    await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc,
                                                            on_hand=5))
                    order = rp.RouteOrderRequest(order=rp.RoutingOrder(
                        lines=[rp.OrderLine(sku=sku, quantity=1)], dest_lat=52.2,
                        dest_lon=21.0))
                    routing = rp_grpc.RoutingServiceStub(ch)
                    err = await expect_error(routing.RouteOrder(order, timeout=30),
                                             grpc.StatusCode.UNAVAILABLE)
                    assert "compiled" in (err.details() or "") and retry_after(err) >= 5
                    health = health_pb2_grpc.HealthStub(ch).Watch(
                        health_pb2.HealthCheckRequest(service=ROUTING))
                    assert (await health.read()).status == NOT_SERVING
            except BaseException:
                svc.kill()
                raise
        try:  # the lock is free: the compile runs, then routing serves
            async with grpc.aio.insecure_channel(svc.target) as ch:
                health = health_pb2_grpc.HealthStub(ch).Watch(
                    health_pb2.HealthCheckRequest(service=ROUTING))
                while (await asyncio.wait_for(health.read(), 300)).status != SERVING:
                    pass
                got = await rp_grpc.RoutingServiceStub(ch).RouteOrder(order, timeout=30)
                assert got.plan.shipments[0].location_id == loc
            assert not warm_children(svc.proc.pid)  # type: ignore[union-attr]
            text = svc.log_tail(400)
            assert "routing.pool.tol is not in numba's cache" in text
            assert "compiled 1 kernels" in text, text
            svc.terminate()
            assert await asyncio.to_thread(svc.wait, 60) == 0
        finally:
            svc.kill()


async def test_sigterm_while_the_kernels_compile_stops_the_compile_and_exits_clean(
        stores: Stores, tmp_path: Path) -> None:
    async with own_site(stores) as site:
        svc = ServiceProcess(site.redis_url, site.database_url, site.root, log_level="INFO")
        with compile_held(tmp_path / "tmp") as tmp:
            svc.env.update(NUMBA_CACHE_DIR=str(cache_missing_one_kernel(tmp_path)),
                           TMPDIR=str(tmp))
            await asyncio.to_thread(svc.start)
            try:
                assert svc.proc is not None

                async def compiling() -> list[psutil.Process]:
                    return warm_children(svc.proc.pid)  # type: ignore[union-attr]

                await eventually(compiling, within=120, what="the compile child started")
                child = warm_children(svc.proc.pid)[0]
                svc.terminate()
                assert await asyncio.to_thread(svc.wait, 60) == 0, svc.log_tail()
                _, alive = await asyncio.to_thread(psutil.wait_procs, [child], 30)
                assert not alive, "the compile outlived the service"
            finally:
                svc.kill()


async def test_sigterm_during_the_start_stops_it_in_order(stores: Stores) -> None:
    """A signal while the start is held (here in the Redis check, its writes paused) cancels
    the start: the process unwinds what it began and exits 0, without ever serving."""
    async with own_site(stores) as site:
        admin = aioredis.Redis.from_url(site.redis_url)
        # held for as long as the test needs: the check's 2 s default timed out first when a
        # busy box (load 12) took that long to deliver and handle the signal
        svc = ServiceProcess(site.redis_url, site.database_url, site.root, log_level="INFO",
                             redis_timeout_s=120)
        try:
            await admin.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")
            svc.proc = await asyncio.to_thread(
                subprocess.Popen, [sys.executable, "-m", "inventory_svc.cli", "serve"],
                env=svc.env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            assert svc.proc.stdout is not None
            lines: list[str] = []
            for line in svc.proc.stdout:  # up to the moment the start is held
                lines.append(line)
                if "not serving yet" in line:
                    break
            svc.terminate()
            rest, _ = await asyncio.to_thread(svc.proc.communicate, timeout=60)
            out = "".join(lines) + rest
            assert svc.proc.returncode == 0, out
            assert "stopped while starting" in out and "serving gRPC" not in out, out
            assert "Traceback" not in out, out
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()
            svc.kill()
