"""WatchStock over real gRPC (docs/WATCH.md): every committed change once, in commit order, with
its cause, matching the ledger; resume after a disconnect and after the serving replica is
killed -9; filters and the principal's scope; alerts once per crossing; heartbeats; a consumer
that stops reading is cut off while everything else goes on; the CLI and the example consumer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import watch_service_pb2 as wp
from inventory.v1 import watch_service_pb2_grpc as wp_grpc
from tests.conftest import World, make_world, store_location, uid
from tests.grpc_helpers import details, expect_error

Stub = api_grpc.InventoryServiceStub
K = wp.StockEventKind
REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60.0  # a safety net against a hang, never a measure of anything


def kind(name: str) -> int:
    return int(wp.StockEventKind.Value(f"STOCK_EVENT_KIND_{name}"))


@dataclass
class Reader:
    """A consumer of one stream: what it has received so far, by type."""

    call: grpc.aio.UnaryStreamCall[wp.WatchStockRequest, wp.WatchStockResponse]
    events: list[wp.StockEvent] = field(default_factory=list)
    snapshot: list[wp.StockState] = field(default_factory=list)
    snapshot_seq: int | None = None
    heartbeats: list[wp.Heartbeat] = field(default_factory=list)

    async def next(self) -> wp.WatchStockResponse:
        async with asyncio.timeout(WAIT_S):
            msg = await self.call.read()
        assert msg is not grpc.aio.EOF, "the stream ended"
        assert isinstance(msg, wp.WatchStockResponse)
        item = msg.WhichOneof("item")
        if item == "event":
            self.events.append(msg.event)
        elif item == "snapshot":
            self.snapshot.extend(msg.snapshot.states)
            if msg.snapshot.done:
                self.snapshot_seq = msg.snapshot.sequence
        else:
            self.heartbeats.append(msg.heartbeat)
        return msg

    async def until(self, done: Callable[[Reader], bool]) -> None:
        while not done(self):
            await self.next()

    async def snapshot_done(self) -> int:
        await self.until(lambda r: r.snapshot_seq is not None)
        assert self.snapshot_seq is not None
        return self.snapshot_seq


def watch(channel: grpc.aio.Channel, **kw: object) -> Reader:
    return Reader(wp_grpc.WatchServiceStub(channel).WatchStock(wp.WatchStockRequest(**kw)))


def fresh(events: list[wp.StockEvent], snapshot: list[wp.StockState]) -> list[wp.StockEvent]:
    """The consumer's rule after a snapshot: an event whose change_seq is not above the one the
    snapshot had for its row is already in the snapshot."""
    seen = {(s.sku, s.location_id): s.change_seq for s in snapshot}
    return [e for e in events
            if e.state.change_seq > seen.get((e.state.sku, e.state.location_id), 0)]


def by_kind(events: list[wp.StockEvent]) -> list[tuple[str, str, str]]:
    return [(wp.StockEventKind.Name(e.kind).removeprefix("STOCK_EVENT_KIND_"), e.state.sku,
             e.state.location_id) for e in events]


async def levels(stub: Stub, w: World) -> dict[tuple[str, str], tuple[int, int]]:
    got = await stub.GetAvailability(api.GetAvailabilityRequest(
        skus=w.skus, location_ids=w.locations))
    return {(lv.sku, lv.location_id): (lv.on_hand, lv.reserved)
            for item in got.items for lv in item.levels}


def applied(base: dict[tuple[str, str], tuple[int, int]], events: list[wp.StockEvent]
            ) -> dict[tuple[str, str], tuple[int, int]]:
    out = dict(base)
    for e in events:
        out[(e.state.sku, e.state.location_id)] = (e.state.on_hand, e.state.reserved)
    return out


async def test_every_change_once_in_commit_order_with_its_cause_and_the_ledgers_numbers(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    w = await make_world(stub, locations=3, skus=3, on_hand=10, safety=1)
    (x, y, z), (a, b, c) = w.skus, w.locations
    r = watch(channel, skus=w.skus, snapshot=True)
    s0 = await r.snapshot_done()
    assert sorted((s.sku, s.location_id, s.on_hand) for s in r.snapshot) == sorted(
        (sku, loc, 10) for sku in w.skus for loc in w.locations)
    whole = watch(channel, after_sequence=s0)  # every event of the service, unfiltered
    before = {(sku, loc): max([m.id for m in (await stub.ListMovements(api.ListMovementsRequest(
        sku=sku, location_id=loc))).movements], default=0)
        for sku in w.skus for loc in w.locations}

    # each step commits before the next starts: its events come after the previous step's
    expected: list[set[tuple[str, str, str]]] = []
    r1 = (await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=x, location_id=a, quantity=2),
        pb.ReservationLine(sku=y, location_id=b, quantity=1)], order_ref="o-1"))).reservation
    expected.append({("RESERVE", x, a), ("RESERVE", y, b)})
    await stub.ReleaseReservation(api.ReleaseReservationRequest(
        reservation_id=r1.id, lines=[pb.ReservationLine(sku=x, location_id=a, quantity=1)]))
    expected.append({("RELEASE", x, a)})
    await stub.CommitReservation(api.CommitReservationRequest(reservation_id=r1.id))
    expected.append({("COMMIT", x, a), ("COMMIT", y, b)})
    r2 = (await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=z, location_id=c, quantity=3)]))).reservation
    expected.append({("RESERVE", z, c)})
    await stub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=r2.id))
    expected.append({("RELEASE", z, c)})
    sale = await stub.Sell(api.SellRequest(location_id=a, items=[api.SkuQuantity(
        sku=x, quantity=2)], order_ref="pos-1"))
    expected.append({("SALE", x, a)})
    await stub.AdjustStock(api.AdjustStockRequest(
        sku=y, location_id=a, delta=5, reason=api.ADJUSTMENT_REASON_RECEIPT))
    expected.append({("RECEIPT", y, a)})
    await stub.AdjustStock(api.AdjustStockRequest(
        sku=y, location_id=a, delta=-1, reason=api.ADJUSTMENT_REASON_DAMAGE))
    expected.append({("ADJUSTMENT", y, a)})
    await stub.SetStock(api.SetStockRequest(sku=z, location_id=b, on_hand=7))
    expected.append({("COUNT", z, b)})
    await stub.TransferStock(api.TransferStockRequest(
        sku=x, from_location_id=b, to_location_id=c, quantity=2))
    expected.append({("TRANSFER", x, b), ("TRANSFER", x, c)})
    await stub.ReturnItems(api.ReturnItemsRequest(
        location_id=a, items=[api.SkuQuantity(sku=x, quantity=1)],
        reservation_id=sale.reservation.id))
    expected.append({("RETURN", x, a)})

    async def rows() -> AsyncIterator[api.ImportStockRequest]:
        yield api.ImportStockRequest(rows=[
            api.ImportRow(sku=y, location_id=c, on_hand=20),
            api.ImportRow(sku=z, location_id=a, on_hand=15)])

    await stub.ImportStock(rows())
    expected.append({("IMPORT", y, c), ("IMPORT", z, a)})
    await stub.SetSafetyStock(api.SetSafetyStockRequest(
        sku=x, location_id=c, safety_stock=3))
    expected.append({("SAFETY_STOCK", x, c)})
    r3 = (await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=z, location_id=b, quantity=1)], ttl_seconds=1))).reservation
    expected.append({("RESERVE", z, b)})
    expected.append({("EXPIRY", z, b)})  # the sweeper's, once its second is up
    total = sum(len(g) for g in expected)

    await r.until(lambda r: len(fresh(r.events, r.snapshot)) >= total)
    got = fresh(r.events, r.snapshot)
    assert len(got) == total, by_kind(got)
    # exactly once, in sequence order, step by step
    seqs = [e.sequence for e in got]
    assert seqs == sorted(set(seqs)), seqs
    at = 0
    for group in expected:
        assert set(by_kind(got[at:at + len(group)])) == group, (group, by_kind(got))
        at += len(group)
    # who did it
    refs = {(k, sku, loc): (list(e.reservation_ids), list(e.order_refs))
            for (k, sku, loc), e in zip(by_kind(got), got, strict=True)}
    assert refs[("RESERVE", x, a)] == ([r1.id], ["o-1"])
    assert refs[("COMMIT", y, b)] == ([r1.id], ["o-1"])
    assert refs[("RELEASE", z, c)] == ([r2.id], [])
    assert refs[("SALE", x, a)] == ([sale.reservation.id], ["pos-1"])
    assert refs[("RETURN", x, a)] == ([sale.reservation.id], ["pos-1"])
    assert refs[("EXPIRY", z, b)] == ([r3.id], [])
    # the ledger's numbers: every on_hand change is a movement, in the same order
    for sku in w.skus:
        for loc in w.locations:
            moves = [m.on_hand_after for m in (await stub.ListMovements(
                api.ListMovementsRequest(sku=sku, location_id=loc))).movements
                if m.id > before[(sku, loc)]]
            changes = [e.state.on_hand for e in got
                       if (e.state.sku, e.state.location_id) == (sku, loc) and e.on_hand_delta]
            assert changes == moves, (sku, loc)
    # the snapshot with the events is the stock now
    base = {(s.sku, s.location_id): (s.on_hand, s.reserved) for s in r.snapshot}
    assert applied(base, got) == await levels(stub, w)
    # the unfiltered stream: every sequence once, none skipped
    last = got[-1].sequence
    await whole.until(lambda rd: bool(rd.events) and rd.events[-1].sequence >= last)
    assert [e.sequence for e in whole.events] == list(range(s0 + 1, last + 1))
    r.call.cancel()
    whole.call.cancel()


async def test_a_consumer_resumes_after_the_last_sequence_it_saw_and_misses_nothing(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=100)
    sku, loc = w.skus[0], w.locations[0]
    first = watch(channel, skus=[sku], snapshot=True)
    await first.snapshot_done()
    for n in range(1, 7):
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=100 + n))
    await first.until(lambda r: any(e.state.on_hand == 103 for e in r.events))
    first.call.cancel()  # the consumer goes away after on_hand 103
    seen = fresh(first.events, first.snapshot)
    last = seen[-1].sequence
    for n in range(7, 10):  # while it is away
        await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=100 + n))
    again = watch(channel, skus=[sku], after_sequence=last)
    await again.until(lambda r: any(e.state.on_hand == 109 for e in r.events))
    assert all(e.sequence > last for e in again.events)
    counts = [e.state.on_hand for e in seen + again.events]
    assert counts == list(range(101, 110)), counts
    # a cursor from further back gets those events again: repeats only up to the cursor given
    older = watch(channel, skus=[sku], after_sequence=seen[0].sequence - 1)
    await older.until(lambda r: any(e.state.on_hand == 109 for e in r.events))
    assert [e.state.on_hand for e in older.events] == list(range(101, 110))
    again.call.cancel()
    older.call.cancel()


async def test_a_cursor_ahead_of_the_stream_is_refused(channel: grpc.aio.Channel) -> None:
    r = watch(channel, after_sequence=2**62)
    err = await expect_error(r.next(), grpc.StatusCode.FAILED_PRECONDITION)
    assert [v.type for d in details(err) for v in getattr(d, "violations", [])] == [
        "CURSOR_AHEAD"]


async def test_filters_by_sku_location_prefix_and_kind(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    prefix = uid("WF")
    locs = [f"{prefix}-A", f"{prefix}-B", uid("WO")]
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
        store_location(x) for x in locs]))
    skus = [uid("SKU"), uid("SKU")]
    by_prefix = watch(channel, skus=skus, location_prefix=prefix + "-", snapshot=True,
                      heartbeat_ms=100)
    one = watch(channel, skus=[skus[0]], location_ids=[locs[2]], snapshot=True, heartbeat_ms=100)
    counts = watch(channel, skus=skus, kinds=[kind("COUNT")], snapshot=True, heartbeat_ms=100)
    every = watch(channel, skus=skus, snapshot=True)
    for r in (by_prefix, one, counts, every):
        await r.snapshot_done()
    for sku in skus:
        for loc in locs:
            await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=5))
            await stub.Reserve(api.ReserveRequest(lines=[
                pb.ReservationLine(sku=sku, location_id=loc, quantity=1)]))
    await every.until(lambda r: len(fresh(r.events, r.snapshot)) >= 2 * len(skus) * len(locs))
    last = every.events[-1].sequence
    for r, want, kinds in (
        (by_prefix, {(s, x) for s in skus for x in locs[:2]}, {"COUNT", "RESERVE"}),
        (one, {(skus[0], locs[2])}, {"COUNT", "RESERVE"}),
        (counts, {(s, x) for s in skus for x in locs}, {"COUNT"}),
    ):
        # a heartbeat at or past the last event: it has looked at everything
        await r.until(lambda rd: bool(rd.heartbeats) and rd.heartbeats[-1].sequence >= last)
        got = by_kind(fresh(r.events, r.snapshot))
        assert sorted(got) == sorted((k, s, x) for k in kinds for s, x in want)
        assert {(st.sku, st.location_id) for st in r.snapshot} == want
        r.call.cancel()
    every.call.cancel()


async def test_alerts_fire_once_per_crossing(stub: Stub, channel: grpc.aio.Channel) -> None:
    w = await make_world(stub, locations=2, skus=1, on_hand=3)
    sku, (a, b) = w.skus[0], w.locations
    r = watch(channel, skus=[sku], snapshot=True, alerts_only=True, low_stock_threshold=4,
              location_alerts=True, channel=pb.CHANNEL_WEB)
    await r.snapshot_done()

    async def reserve(loc: str, qty: int) -> str:
        got = await stub.Reserve(api.ReserveRequest(lines=[
            pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)]))
        return got.reservation.id

    await reserve(a, 2)  # 6 -> 4: not below 4
    await reserve(a, 1)  # -> 3: LOW_STOCK; a: 1 -> 0 SOLD_OUT there
    await reserve(b, 1)  # -> 2: nothing new
    last = await reserve(b, 2)  # -> 0: SOLD_OUT; b: 2 -> 0 SOLD_OUT there
    await stub.ReleaseReservation(api.ReleaseReservationRequest(reservation_id=last))
    # -> 2: BACK_IN_STOCK (and not LOW_STOCK: from 0 it crossed nothing downwards); b too
    await stub.AdjustStock(api.AdjustStockRequest(
        sku=sku, location_id=a, delta=10, reason=api.ADJUSTMENT_REASON_RECEIPT))
    # -> 12: a back in stock there; the SKU was in stock already

    def alerts(rd: Reader) -> list[tuple[str, str, str, int, int]]:
        return [(wp.StockAlertKind.Name(x.kind).removeprefix("STOCK_ALERT_KIND_"),
                 wp.StockAlertScope.Name(x.scope).removeprefix("STOCK_ALERT_SCOPE_"),
                 e.state.location_id, x.available_before, x.available_after)
                for e in fresh(rd.events, rd.snapshot) for x in e.alerts]

    want = [("LOW_STOCK", "SKU", a, 4, 3), ("SOLD_OUT", "LOCATION", a, 1, 0),
            ("SOLD_OUT", "SKU", b, 2, 0), ("SOLD_OUT", "LOCATION", b, 2, 0),
            ("BACK_IN_STOCK", "SKU", b, 0, 2), ("BACK_IN_STOCK", "LOCATION", b, 0, 2),
            ("BACK_IN_STOCK", "LOCATION", a, 0, 10)]
    await r.until(lambda rd: len(alerts(rd)) >= len(want))
    assert alerts(r) == want
    assert all(e.alerts for e in r.events)  # alerts_only: nothing else
    low = [x for e in r.events for x in e.alerts if x.kind == wp.STOCK_ALERT_KIND_LOW_STOCK]
    assert [x.threshold for x in low] == [4]
    r.call.cancel()


async def test_an_idle_stream_sends_heartbeats_that_say_how_far_it_has_looked(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    w = await make_world(stub, locations=1, skus=2, on_hand=1)
    quiet, busy = w.skus
    r = watch(channel, skus=[quiet], heartbeat_ms=100)
    await r.until(lambda rd: bool(rd.heartbeats))
    start = r.heartbeats[0].sequence
    await stub.SetStock(api.SetStockRequest(sku=busy, location_id=w.locations[0], on_hand=2))
    other = watch(channel, skus=[busy], after_sequence=start)
    await other.until(lambda rd: bool(rd.events))
    passed = other.events[0].sequence
    # the quiet stream's heartbeats move past the event it does not want
    await r.until(lambda rd: rd.heartbeats[-1].sequence >= passed)
    assert not r.events
    assert r.heartbeats[-1].head_sequence >= passed
    err = await expect_error(watch(channel, heartbeat_ms=5).next(),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert "heartbeat_ms" in (err.details() or "")
    r.call.cancel()
    other.call.cancel()
