"""Retention (app/retention.py, docs/WATCH.md): old idempotency records, outbox rows, stock events,
ended reservations and days of capacity use are deleted after their windows, in small batches,
skipping rows someone holds; nothing a live stream still needs goes, nor a day's capacity row a
live reservation will give a shipment back on; a stream resumed from before what is kept is told
to take a snapshot.

A database and Redis of their own (tests/faults/harness.py own_site): rows are aged in place and
retention runs on all of them. The service's sequencer and retention run only when a test says
(their intervals are an hour), so each run sees exactly what the test made."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest_asyncio
from prometheus_client import REGISTRY

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import watch_service_pb2 as wp
from inventory.v1 import watch_service_pb2_grpc as wp_grpc
from inventory_svc.app.retention import Retention
from inventory_svc.app.watch import Sequencer
from inventory_svc.server import Running, serve
from inventory_svc.storage import pg_retention
from tests.conftest import Stores, make_world, uid
from tests.faults.harness import own_site, site_settings
from tests.grpc_helpers import details, expect_error

HOUR = "interval '1 hour'"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def svc(stores: Stores) -> AsyncIterator[Running]:
    async with own_site(stores) as site, serve(site_settings(
            stores, site, watch_sequence_ms=3_600_000.0, retention_interval_s=3600.0,
            retention_batch=2)) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def stub(svc: Running) -> AsyncIterator[api_grpc.InventoryServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        yield api_grpc.InventoryServiceStub(ch)


def db(svc: Running) -> asyncpg.Pool:
    return svc.ctx.pg.pool


async def numbered(svc: Running) -> int:
    """Number every committed change (the test's own sequencer pass) and return the head."""
    await Sequencer(svc.ctx).run_once()
    return int(await db(svc).fetchval("SELECT last_seq FROM watch_state"))


async def test_idempotency_records_go_after_72_hours_and_a_repeat_then_runs_anew(
    svc: Running, stub: api_grpc.InventoryServiceStub
) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=1)
    sku, loc = w.skus[0], w.locations[0]
    old = [uid("old") for _ in range(5)]  # more than a batch (2): retention goes on batch by batch
    young = uid("young")
    for n, key in enumerate([*old, young]):
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=10 + n,
                                                idempotency_key=key))
    await db(svc).execute(
        f"UPDATE idempotency SET created_at = now() - 73 * {HOUR} WHERE key = ANY($1::text[])",
        old)
    # a record someone holds (a call of that key looking at it) is skipped, not waited for
    async with db(svc).acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM idempotency WHERE key = $1 FOR UPDATE", old[0])
        report = await Retention(svc.ctx).run_once()
    assert report.idempotency == 4
    report = await Retention(svc.ctx).run_once()
    assert report.idempotency == 1
    left = {r["key"] for r in await db(svc).fetch(
        "SELECT key FROM idempotency WHERE key = ANY($1::text[])", [*old, young])}
    assert left == {young}
    # the old key is free again: another request under it runs; the young one still replays
    got = await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=99,
                                                  idempotency_key=old[0]))
    assert got.stock.on_hand == 99
    await expect_error(stub.SetStock(api.SetStockRequest(
        sku=sku, location_id=loc, on_hand=98, idempotency_key=young)),
        grpc.StatusCode.ALREADY_EXISTS)


async def test_events_go_after_their_window_but_not_what_a_live_stream_still_needs(
    svc: Running, stub: api_grpc.InventoryServiceStub
) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=1)
    sku, loc = w.skus[0], w.locations[0]
    for n in range(6):
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=2 + n))
    head = await numbered(svc)
    oldest = int(await db(svc).fetchval("SELECT min(seq) FROM stock_events"))
    needed = head - 3  # a live stream of another process stands here
    await db(svc).execute(
        "INSERT INTO watch_cursors (holder, seq) VALUES ('another-process', $1)", needed)
    await db(svc).execute(f"UPDATE stock_events SET committed_at = now() - 8 * 24 * {HOUR}")
    report = await Retention(svc.ctx).run_once()
    assert report.events == needed - oldest + 1
    kept = [r["seq"] for r in await db(svc).fetch("SELECT seq FROM stock_events ORDER BY seq")]
    assert kept == list(range(needed + 1, head + 1))
    # the stream there goes on; one from before what is kept is told to take a snapshot
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        watch = wp_grpc.WatchServiceStub(ch)
        on = watch.WatchStock(wp.WatchStockRequest(after_sequence=needed))
        first = await on.read()
        assert isinstance(first, wp.WatchStockResponse)
        assert first.event.sequence == needed + 1
        on.cancel()
        late = watch.WatchStock(wp.WatchStockRequest(after_sequence=needed - 1))
        err = await expect_error(late.read(), grpc.StatusCode.FAILED_PRECONDITION)
        assert [v.type for d in details(err) for v in getattr(d, "violations", [])] == [
            "CURSOR_EXPIRED"]
        assert "take a snapshot" in (err.details() or "")
        # this process's own streams are recorded too
        live = watch.WatchStock(wp.WatchStockRequest(after_sequence=head, heartbeat_ms=100))
        await live.read()  # a heartbeat: the stream is open and at the head
        assert svc.watch is not None
        await svc.watch.hub.save_cursors()
        assert await db(svc).fetchval(
            "SELECT seq FROM watch_cursors WHERE holder = $1", svc.watch.hub.holder) == head
        live.cancel()
    # a cursor not refreshed for long protects nothing any more, and goes
    await db(svc).execute(
        f"UPDATE watch_cursors SET updated_at = now() - {HOUR} WHERE holder = 'another-process'")
    report = await Retention(svc.ctx).run_once()
    assert report.cursors == 1
    assert report.events == head - needed
    assert await db(svc).fetchval("SELECT count(*) FROM stock_events") == 0


async def test_outbox_rows_go_after_their_window_once_numbered(
    svc: Running, stub: api_grpc.InventoryServiceStub
) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=1)
    sku, loc = w.skus[0], w.locations[0]
    await numbered(svc)
    await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=5))
    await db(svc).execute(f"UPDATE outbox SET created_at = now() - 8 * 24 * {HOUR}")
    # a change not numbered yet may still need its transaction's outbox rows: none goes
    await db(svc).execute(f"UPDATE stock_changes SET changed_at = now() - 9 * 24 * {HOUR}")
    assert (await Retention(svc.ctx).run_once()).outbox == 0
    await numbered(svc)
    young = await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=6))
    assert young.stock.on_hand == 6
    report = await Retention(svc.ctx).run_once()
    assert report.outbox > 0
    ages = [r["old"] for r in await db(svc).fetch(
        f"SELECT created_at < now() - {HOUR} AS old FROM outbox")]
    assert ages and not any(ages)  # the young row stays


async def test_ended_reservations_go_after_90_days_the_active_and_young_stay(
    svc: Running, stub: api_grpc.InventoryServiceStub
) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=10)
    sku, loc = w.skus[0], w.locations[0]
    day_ms = 86_400_000
    now_ms = int(await db(svc).fetchval("SELECT extract(epoch FROM now()) * 1000"))

    def rid(days_ago: int, tag: str) -> str:  # what app/reservations.py makes, made then
        return f"r{now_ms - days_ago * day_ms:011x}{tag}"

    rows = [  # id, status, ended days ago (None: still ACTIVE)
        (rid(200, "a0"), "EXPIRED", 199), (rid(150, "b0"), "RELEASED", 150),
        (rid(120, "c0"), "COMMITTED", 119), (rid(100, "d0"), "ACTIVE", None),
        (rid(95, "e0"), "RELEASED", 10), (rid(5, "f0"), "EXPIRED", 5)]
    for res_id, status, ended in rows:
        await db(svc).execute(
            "INSERT INTO reservations (id, status, channel, expires_at, ended_at, created_at)"
            " VALUES ($1, $2, 'WEB', now(), CASE WHEN $3::int IS NULL THEN NULL"
            " ELSE now() - make_interval(days => $3::int) END, now())", res_id, status, ended)
        await db(svc).execute(
            "INSERT INTO reservation_lines (reservation_id, sku, location_id, quantity,"
            " requested) VALUES ($1, $2, $3, 1, 1)", res_id, sku, loc)
    # one of the old ones is held by someone: skipped now, deleted by the next run
    async with db(svc).acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM reservations WHERE id = $1 FOR UPDATE", rows[1][0])
        first = await Retention(svc.ctx).run_once()
    second = await Retention(svc.ctx).run_once()
    assert (first.reservations, second.reservations) == (2, 1)
    left = {r["id"] for r in await db(svc).fetch(
        "SELECT id FROM reservations WHERE id = ANY($1::text[])", [x[0] for x in rows])}
    assert left == {rows[3][0], rows[4][0], rows[5][0]}
    assert await db(svc).fetchval(
        "SELECT count(*) FROM reservation_lines WHERE reservation_id = ANY($1::text[])",
        [x[0] for x in rows]) == 3


async def capacity_days(svc: Running, loc: str) -> list[int]:
    """The days of a location's capacity_usage rows, as days from today."""
    return [r["d"] for r in await db(svc).fetch(
        "SELECT day - current_date AS d FROM capacity_usage WHERE location_id = $1 ORDER BY day",
        loc)]


async def test_capacity_days_go_after_35_days_but_not_today_nor_one_a_reservation_holds(
    svc: Running, stub: api_grpc.InventoryServiceStub
) -> None:
    w = await make_world(stub, locations=2, skus=1, on_hand=10)
    sku, (a, b) = w.skus[0], w.locations
    # a live reservation whose shipment from b was taken 40 days ago (an ACTIVE reservation
    # gives it back on that day's row when it ends: migration 0004), and a sold one of 36 days
    # ago, whose shipment happened: nothing will come back to its row
    held = (await stub.Reserve(api.ReserveRequest(lines=[pb.ReservationLine(
        sku=sku, location_id=b, quantity=1)], ttl_seconds=3600))).reservation
    sold = uid("r")
    await db(svc).execute(
        "UPDATE reservations SET capacity_day = current_date - 40, capacity_locations = $2"
        " WHERE id = $1", held.id, [b])
    await db(svc).execute(
        "INSERT INTO reservations (id, status, channel, expires_at, ended_at, capacity_day,"
        " capacity_locations) VALUES ($1, 'COMMITTED', 'WEB', now(), now(),"
        " current_date - 36, $2)", sold, [b])
    days = {a: [-50, -41, -40, -36, -35, 0, 1], b: [-40, -36]}
    for loc, offsets in days.items():
        await db(svc).execute(
            "INSERT INTO capacity_usage (location_id, day, used)"
            " SELECT $1, current_date + d, 1 FROM unnest($2::int[]) AS d", loc, offsets)
    counted = REGISTRY.get_sample_value(
        "inventory_retention_deleted_total", {"table": "capacity_usage"}) or 0.0
    # a row someone holds (a reservation taking that day's shipment) is skipped, not waited for
    async with db(svc).acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM capacity_usage WHERE location_id = $1"
                           " AND day = current_date - 50 FOR UPDATE", a)
        first = await Retention(svc.ctx).run_once()
    second = await Retention(svc.ctx).run_once()
    assert (first.capacity, second.capacity) == (4, 1)  # over batches of 2
    assert REGISTRY.get_sample_value(
        "inventory_retention_deleted_total", {"table": "capacity_usage"}) == counted + 5
    assert await capacity_days(svc, a) == [-35, 0, 1]
    assert await capacity_days(svc, b) == [-40]
    # released, the reservation gives its shipment back on that row, which then goes
    await stub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=held.id))
    assert await db(svc).fetchval("SELECT used FROM capacity_usage WHERE location_id = $1",
                                  b) == 0
    assert (await Retention(svc.ctx).run_once()).capacity == 1
    assert await capacity_days(svc, b) == []


async def test_capacity_of_today_and_later_stays_whatever_the_window(
    svc: Running, stub: api_grpc.InventoryServiceStub
) -> None:
    loc = (await make_world(stub, locations=1, skus=0)).locations[0]
    await db(svc).execute(
        "INSERT INTO capacity_usage (location_id, day, used)"
        " SELECT $1, current_date + d, 1 FROM unnest($2::int[]) AS d", loc, [-1, 0, 2])
    async with db(svc).acquire() as conn, conn.transaction():
        for window in (-3, 0):
            await pg_retention.purge_capacity(conn, window, 100)
    assert await capacity_days(svc, loc) == [0, 2]
