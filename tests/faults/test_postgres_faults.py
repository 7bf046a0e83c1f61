"""Postgres unreachable for 10-30 s behind the fault proxy (DESIGN §2, §4, I5)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from tests.conftest import Stores, uid
from tests.faults.harness import (
    Load,
    check_all,
    eventually,
    make_world,
    own_site,
    port_of,
    redis_matches_postgres,
    running,
    site_settings,
    with_port,
)
from tests.faults.tcp_proxy import TcpProxy
from tests.faults.test_redis_faults import WHOLE_WITHIN_S, probe

# how long a test waits for what must happen before it calls it a hang (never a speed bound:
# the box may be busy)
HANG_GUARD_S = 120.0
CLIENT_DEADLINE_S = 3.0


async def test_postgres_unreachable_unavailable_in_time_reads_go_on_whole_after(
    stores: Stores, soak: bool
) -> None:
    # (how it fails, seconds): a partition that swallows everything, and a refusing server
    outages = [("blackhole", 30.0), ("refuse", 12.0)] if soak else [("blackhole", 10.0)]
    async with own_site(stores) as site:
        with TcpProxy("127.0.0.1", port_of(site.database_url)) as proxy:
            settings = site_settings(
                stores, site, database_url=with_port(site.database_url, proxy.port),
                pg_timeout_s=1.0, reconcile_interval_s=1.0, pg_pool_max=10)
            async with running(settings) as (svc, stub, ch):
                routing = rp_grpc.RoutingServiceStub(ch)
                w = await make_world(stub, locations=2, skus=3, on_hand=100_000)
                await stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus))  # in Redis
                report = []
                async with Load(f"127.0.0.1:{svc.port}", w, clients=8,
                                deadline=CLIENT_DEADLINE_S) as load:
                    for how, seconds in outages:
                        await load.until_calls(200)
                        down = time.monotonic()
                        if how == "blackhole":
                            proxy.blackhole()
                        else:
                            proxy.refuse()
                            proxy.reset()
                        reads_before = load.ledger.reads_ok
                        # a routing read needs Postgres (capacity): UNAVAILABLE, never INTERNAL
                        try:
                            await routing.RouteOrder(rp.RouteOrderRequest(order=rp.RoutingOrder(
                                lines=[rp.OrderLine(sku=w.skus[0], quantity=1)],
                                dest_lat=52.0, dest_lon=21.0)), timeout=CLIENT_DEADLINE_S)
                        except grpc.aio.AioRpcError as err:
                            assert err.code() is grpc.StatusCode.UNAVAILABLE, err
                        while time.monotonic() - down < seconds:
                            await load.until_calls(20, within=HANG_GUARD_S)
                        up = time.monotonic()
                        proxy.heal()
                        reads = load.ledger.reads_ok - reads_before
                        assert reads > 0, "no read was served while postgres was away"
                        whole = await eventually(lambda: probe(stub, w.skus[0], w.locations[0]),
                                                 within=WHOLE_WITHIN_S,
                                                 what="whole again after postgres came back")
                        # and the load's own mutations go through again
                        acked = len(load.ledger.acks)
                        await eventually(lambda acked=acked: _more(load, acked, 20), within=WHOLE_WITHIN_S,
                                         what="load's mutations acknowledged again")
                        during = [a for a in load.ledger.acks if down + 0.5 < a[0] < up]
                        read_fails = [f for f in load.ledger.reads_failed if down < f[0] < up]
                        report.append((how, seconds, reads, len(read_fails), round(whole, 2)))
                        assert not during, f"confirmed without postgres: {during[:5]}"
                        assert not read_fails, f"reads failed during the outage: {read_fails[:5]}"
                led = load.ledger
                assert not led.odd, f"codes no client may see: {led.odd[:10]}"
                assert led.codes["UNAVAILABLE"] > 0
                await eventually(lambda: redis_matches_postgres(
                    svc.ctx.pg.pool, svc.ctx.redis.client, w.skus),
                    within=HANG_GUARD_S,  # a guard against a hang, not a speed bound
                    what="I4 after the outage")
                await check_all(svc.ctx.pg.pool, svc.ctx.redis.client, w.skus, led)
                print(f"postgres outages (how, s, reads served, reads failed, whole after s):"
                      f" {report}; codes {dict(led.codes)}")


async def _more(load: Load, acked: int, n: int) -> bool:
    return len(load.ledger.acks) - acked >= n


async def test_deadline_shorter_than_delay_then_retry_same_key_never_doubles(
    stores: Stores, soak: bool
) -> None:
    trials = 1000 if soak else 200
    batch = 25
    async with own_site(stores) as site:
        with TcpProxy("127.0.0.1", port_of(site.database_url)) as proxy:
            settings = site_settings(
                stores, site, database_url=with_port(site.database_url, proxy.port),
                pg_timeout_s=2.0, reconcile_interval_s=1.0, pg_pool_max=30)
            async with running(settings) as (svc, stub, _):
                w = await make_world(stub, locations=2, skus=2, on_hand=1_000_000)
                rng = random.Random(5)
                first_codes: Counter[str] = Counter()
                aborted = 0

                async def trial(n: int, delay: float) -> tuple[str, str]:
                    nonlocal aborted
                    sku, loc = rng.choice(w.pairs())
                    request = api.ReserveRequest(
                        lines=[pb.ReservationLine(sku=sku, location_id=loc,
                                                  quantity=rng.randint(1, 3))],
                        idempotency_key=uid("dl"), order_ref=f"dl-{n}-{uid('o')}")
                    first = ""
                    try:  # the client gives up before the proxy delivers
                        out = await stub.Reserve(request, timeout=rng.uniform(0.002, 24 * delay))
                        first = out.reservation.id
                        first_codes["OK"] += 1
                    except grpc.aio.AioRpcError as err:
                        first_codes[err.code().name] += 1
                        assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                              grpc.StatusCode.UNAVAILABLE), err
                    while True:  # and retries with the same key, as the API asks
                        try:
                            again = await stub.Reserve(request, timeout=10)
                            break
                        except grpc.aio.AioRpcError as err:
                            assert err.code() in (grpc.StatusCode.ABORTED,
                                                  grpc.StatusCode.UNAVAILABLE), err
                            aborted += 1
                            await asyncio.sleep(0.05)
                    assert not first or again.reservation.id == first, "a retry got another answer"
                    return request.order_ref, again.reservation.id

                answers: list[tuple[str, str]] = []
                for b in range(trials // batch):
                    # one way; a reservation is some 6 round trips, so the clients' deadlines
                    # (up to 24 one-way delays) end in every phase of it, or after it
                    delay = [0.005, 0.01, 0.02, 0.04][b % 4]
                    proxy.set_latency(upstream=delay, downstream=delay)
                    answers += await asyncio.gather(*(trial(b * batch + i, delay)
                                                      for i in range(batch)))
                proxy.set_latency()
                refs = [a[0] for a in answers]
                rows = await svc.ctx.pg.pool.fetch(
                    "SELECT order_ref, array_agg(id) AS ids FROM reservations"
                    " WHERE order_ref = ANY($1::text[]) GROUP BY order_ref", refs)
                doubles = [dict(r) for r in rows if len(r["ids"]) != 1]
                assert not doubles, f"double reservations: {doubles[:5]}"
                by_ref = {r["order_ref"]: r["ids"][0] for r in rows}
                assert {ref: by_ref.get(ref) for ref, _ in answers} == dict(answers)
                t0 = time.monotonic()
                await eventually(lambda: redis_matches_postgres(
                    svc.ctx.pg.pool, svc.ctx.redis.client, w.skus),
                    within=HANG_GUARD_S,  # a guard against a hang, not a speed bound
                    what="I4 after the retries")
                print("I4 in", time.monotonic() - t0)
                await check_all(svc.ctx.pg.pool, svc.ctx.redis.client, w.skus)
                print(f"deadline < delay, retried with the same key x{trials}: 0 doubles; first "
                      f"tries {dict(first_codes)}, retries told ABORTED/UNAVAILABLE {aborted}x")
