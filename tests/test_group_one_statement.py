"""A group of plain reservations commits in one statement (storage/pg_group.reserve_at_once)
when Postgres has all it asks; when not, nothing of it is written and the group goes the locked
way, which answers each call as before (DESIGN I1, I5, I6)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import grpc
import pytest

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running
from inventory_svc.storage.pg_base import advisory_key, to_ms
from tests.conftest import make_world, uid
from tests.grpc_helpers import expect_error
from tests.invariants import assert_invariants
from tests.test_group_commit import outcome, wait_until

pytestmark = pytest.mark.redis_cluster

Stub = api_grpc.InventoryServiceStub


def line(sku: str, loc: str, qty: int) -> pb.ReservationLine:
    return pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)


async def reserved(stub: Stub, sku: str) -> int:
    out = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
    return sum(lv.reserved for lv in out.items[0].levels)


async def test_a_group_that_fits_is_one_statement_stamped_with_postgres_time(
    stub: Stub, service: Running,
) -> None:
    group = service.reservations.group
    w = await make_world(stub, locations=1, skus=2, on_hand=10, safety=2)
    (a, b), loc = w.skus, w.locations[0]
    await stub.Reserve(api.ReserveRequest(lines=[line(a, loc, 1)]))  # Postgres' clock is read
    before = Counter(group.ways)
    async with service.ctx.pg.pool.acquire() as conn:
        start = to_ms(await conn.fetchval("SELECT now()"))
        answers = await asyncio.gather(*(stub.Reserve(api.ReserveRequest(
            lines=[line(a, loc, 2), line(b, loc, 1)], ttl_seconds=60, idempotency_key=uid("k"),
            channel=pb.CHANNEL_WEB)) for _ in range(3)))
        end = to_ms(await conn.fetchval("SELECT now()"))
        rows = {r["id"]: r for r in await conn.fetch(
            "SELECT id, status, created_at, expires_at FROM reservations WHERE id = ANY($1)",
            [x.reservation.id for x in answers])}
    went = Counter(group.ways)
    went.subtract(before)
    assert went["one_statement"] >= 1
    assert went["refused_one_statement"] == went["transaction"] == 0
    for x in answers:
        res, row = x.reservation, rows[x.reservation.id]
        assert row["status"] == "ACTIVE"
        assert (res.created_at_unix_ms, res.expires_at_unix_ms) == (
            to_ms(row["created_at"]), to_ms(row["expires_at"]))
        # the clock is Postgres' as last read, run on by ours: off by about a round trip
        assert start - 1_000 <= res.created_at_unix_ms <= end + 1_000
        assert res.expires_at_unix_ms - res.created_at_unix_ms == 60_000
    assert (await reserved(stub, a), await reserved(stub, b)) == (7, 3)
    # web may not take the last 2 of `a`'s 3 left: its safety stock
    await expect_error(stub.Reserve(api.ReserveRequest(lines=[line(a, loc, 2)],
                                                       channel=pb.CHANNEL_WEB)),
                       grpc.StatusCode.FAILED_PRECONDITION)
    await assert_invariants(service, [a, b])


async def test_a_group_postgres_cannot_serve_whole_writes_nothing_then_goes_call_by_call(
    stub: Stub, service: Running,
) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=10)
    sku, loc, group = w.skus[0], w.locations[0], service.reservations.group
    await stub.Reserve(api.ReserveRequest(lines=[line(sku, loc, 1)]))
    before = Counter(group.ways)
    two = api.ReserveRequest(lines=[line(sku, loc, 2)])

    # Redis holds 4 x 2 of the 9 it knows of; meanwhile 4 leave the shelf in Postgres, so
    # only 2 calls can have their units, whichever groups they go in.
    async with service.ctx.pg.pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM stock WHERE sku = $1 FOR UPDATE", sku)
            calls = [asyncio.ensure_future(outcome(stub.Reserve(two))) for _ in range(4)]
            await wait_until(lambda: group.queued + group.calls_in_flight == 4,
                             "every call in Postgres or queued for its row")
            await conn.execute(
                "UPDATE stock SET on_hand = on_hand - 4 WHERE sku = $1 AND location_id = $2",
                sku, loc)
            await conn.execute(
                "INSERT INTO movements (sku, location_id, delta, kind, reason, on_hand_after)"
                " VALUES ($1, $2, -4, 'ADJUSTMENT', 'test: behind the service', 6)", sku, loc)
        codes = await asyncio.gather(*calls)
    assert sorted(codes, key=str) == sorted(
        [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.FAILED_PRECONDITION] * 2, key=str)
    went = Counter(group.ways)
    went.subtract(before)
    assert went["refused_one_statement"] >= 1 and went["transaction"] >= 1
    assert await reserved(stub, sku) == 1 + 4
    await assert_invariants(service, [sku])


async def test_a_repeat_and_a_key_in_use_are_answered_as_in_a_transaction(
    stub: Stub, service: Running, channel: grpc.aio.Channel,
) -> None:
    group = service.reservations.group
    w = await make_world(stub, locations=1, skus=1, on_hand=10)
    sku, loc = w.skus[0], w.locations[0]
    raw = channel.unary_unary("/inventory.v1.InventoryService/Reserve")
    first = api.ReserveRequest(lines=[line(sku, loc, 2)], idempotency_key=uid("k"))
    answer = bytes(await raw(first.SerializeToString()))

    before = Counter(group.ways)
    assert bytes(await raw(first.SerializeToString())) == answer  # a repeat: the first answer
    # a call with this key still runs elsewhere: it holds the key's lock
    running = api.ReserveRequest(lines=[line(sku, loc, 1)], idempotency_key=uid("k"))
    async with service.ctx.pg.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)",
                           advisory_key(running.idempotency_key))
        await expect_error(stub.Reserve(running), grpc.StatusCode.ABORTED)
    went = Counter(group.ways)
    went.subtract(before)
    assert (went["refused_one_statement"], went["transaction"]) == (2, 2)
    assert await reserved(stub, sku) == 2
    await stub.Reserve(running)  # its key free again: it takes its unit
    assert await reserved(stub, sku) == 3
    await assert_invariants(service, [sku])


async def test_the_groups_have_connections_of_their_own_and_postgres_keeps_their_plans(
    stub: Stub, service: Running,
) -> None:
    """The group commits' connections come out of INVENTORY_PG_POOL_MAX (the connection count
    operators plan for is unchanged), and on them Postgres keeps the group statement's plan
    instead of planning it for every group; the other connections still plan each statement for
    its input (a bulk import's arrays)."""
    pg, settings = service.ctx.pg, service.ctx.settings
    assert pg.group_pool is not pg.pool
    assert pg.group_pool.get_max_size() == settings.group_pool_size > 0
    # a lane each, but never more than half the pool: the rest keep enough when it is small
    assert replace(settings, pg_pool_max=20, group_commit_lanes=4).group_pool_size == 8
    assert replace(settings, pg_pool_max=10, group_commit_lanes=4).group_pool_size == 5
    assert pg.pool.get_max_size() + pg.group_pool.get_max_size() == settings.pg_pool_max
    w = await make_world(stub, locations=1, skus=1, on_hand=1_000)
    for _ in range(12):  # one after another: groups of one, on the group pool's one connection
        await stub.Reserve(api.ReserveRequest(lines=[line(w.skus[0], w.locations[0], 1)]))
    # every idle connection of the group pool: whichever ran the groups is among them
    conns = [await pg.group_pool.acquire() for _ in range(pg.group_pool.get_size())]
    try:
        generic = custom = 0
        for conn in conns:
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
            kept, planned = await conn.fetchrow(
                "SELECT coalesce(sum(generic_plans), 0), coalesce(sum(custom_plans), 0)"
                " FROM pg_prepared_statements WHERE statement LIKE 'WITH lk AS%'")
            generic, custom = generic + kept, custom + planned
    finally:
        for conn in conns:
            await pg.group_pool.release(conn)
    # every group ran on the kept plan, however large the tables the session has grown
    # (Postgres' own choice, plan_cache_mode = auto, had gone back to planning each group)
    assert generic >= 12 and custom == 0
    async with pg.connection() as conn:
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
