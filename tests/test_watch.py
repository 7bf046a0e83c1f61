"""WatchStock over real gRPC (docs/WATCH.md): every committed change once, in commit order, with
its cause, matching the ledger; resume after a disconnect and after the serving replica is
killed -9; filters and the principal's scope; alerts once per crossing; heartbeats; a consumer
that stops reading is cut off while everything else goes on; the CLI and the example consumer."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import watch_service_pb2 as wp
from inventory.v1 import watch_service_pb2_grpc as wp_grpc
from inventory_svc.app.background import leader_lock
from inventory_svc.app.sequencer import HOLDER_QUERY, Sequencer
from inventory_svc.server import Running, serve
from inventory_svc.storage import pg_watch
from tests.conftest import Stores, World, make_world, settings_for, store_location, uid
from tests.faults.harness import ServiceProcess, eventually, own_site, site_settings
from tests.grpc_helpers import details, expect_error

Stub = api_grpc.InventoryServiceStub
K = wp.StockEventKind
REPO = Path(__file__).resolve().parents[1]
WAIT_S = 20.0  # a safety net against a hang, never a measure of anything


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
    per_message: list[int] = field(default_factory=list)  # events in each message that had any

    async def next(self) -> wp.WatchStockResponse:
        msg = await self.call.read()
        assert msg is not grpc.aio.EOF, "the stream ended"
        assert isinstance(msg, wp.WatchStockResponse)
        item = msg.WhichOneof("item")
        if item == "event":
            self.events.append(msg.event)
            self.per_message.append(1)
        elif item == "events":
            self.events.extend(msg.events.events)
            self.per_message.append(len(msg.events.events))
        elif item == "snapshot":
            self.snapshot.extend(msg.snapshot.states)
            if msg.snapshot.done:
                self.snapshot_seq = msg.snapshot.sequence
        else:
            self.heartbeats.append(msg.heartbeat)
        return msg

    async def until(self, done: Callable[[Reader], bool]) -> None:
        try:
            async with asyncio.timeout(WAIT_S):
                while not done(self):
                    await self.next()
        except TimeoutError:
            last = self.heartbeats[-1].head_sequence if self.heartbeats else None
            raise AssertionError(
                f"the stream did not get there in {WAIT_S} s ({len(self.events)} events, last"
                f" heartbeat's head {last}); Postgres: {await numbering_state()}") from None

    async def snapshot_done(self) -> int:
        await self.until(lambda r: r.snapshot_seq is not None)
        assert self.snapshot_seq is not None
        return self.snapshot_seq


STALL: dict[str, str] = {}  # the session's database_url, to say where a stalled stream stands


@pytest.fixture(autouse=True)
def _say_where_a_stall_stands(stores: Stores) -> None:
    STALL["database_url"] = stores.database_url


async def numbering_state() -> str:
    """What a failure message needs when events stop coming: how far the sequencer got, what
    is left to number, and a pass that holds everyone's turn (the service's own query)."""
    conn = await asyncpg.connect(STALL["database_url"])
    try:
        head = await conn.fetchval("SELECT last_seq FROM watch_state WHERE id = 1")
        left = await conn.fetchval("SELECT count(*) FROM stock_changes")
        holder = await conn.fetchrow(HOLDER_QUERY)
        passes = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%sequencer'")
        trying = conn.transaction()  # a pass of our own, rolled back: does it fail, and how?
        await trying.start()
        try:
            trial = dict(await conn.fetchrow("SELECT * FROM watch_sequence_pass(20000)"))
        except asyncpg.PostgresError as exc:
            trial = {"error": repr(exc)}
        finally:
            await trying.rollback()
    finally:
        await conn.close()
    return (f"last_seq {head}, {left} changes not numbered, {passes} sequencer connections,"
            f" pass holding the turn: {dict(holder) if holder else None}; a pass tried and"
            f" rolled back: {trial}")


def watch(ch: grpc.aio.Channel, **kw: object) -> Reader:
    return Reader(wp_grpc.WatchServiceStub(ch).WatchStock(wp.WatchStockRequest(**kw)))


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
    # each SKU's available-to-promise after its last event is what GetAvailability sums
    totals = await stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus))
    for item in totals.items:
        last_of = [e for e in got if e.state.sku == item.sku][-1]
        assert last_of.sku_available_after == item.total_available, item.sku
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


async def test_a_bulk_change_is_numbered_over_several_passes_in_order(
    stub: Stub, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass numbers whole transactions up to PASS_ROWS changes (a bulk load in one statement
    outlasted the statement timeout, and no pass ever finished): imports bigger than a pass come
    out whole, contiguous and in commit order."""
    monkeypatch.setattr(pg_watch, "PASS_ROWS", 4)
    w = await make_world(stub, locations=3, skus=4, on_hand=1)
    reader = watch(channel, skus=w.skus)
    await reader.until(lambda r: bool(r.heartbeats))  # the stream is at the head
    for on_hand in (10, 20, 30):  # three imports of 12 rows each: 3 passes at least
        await stub.ImportStock(iter([api.ImportStockRequest(rows=[
            api.ImportRow(sku=sku, location_id=loc, on_hand=on_hand)
            for sku in w.skus for loc in w.locations])]))
    # (the world's own counts, on_hand 1, may still be on their way from before the imports)
    def imported(r: Reader) -> list[wp.StockEvent]:
        return [e for e in r.events if e.state.on_hand != 1]

    await reader.until(lambda r: len(imported(r)) >= 36)
    seqs = [e.sequence for e in imported(reader)]
    assert seqs == list(range(seqs[0], seqs[0] + 36)), seqs
    assert [e.state.on_hand for e in imported(reader)] == [10] * 12 + [20] * 12 + [30] * 12
    reader.call.cancel()


async def test_the_events_a_sequencer_notice_carries_are_the_numbered_ones(
    stub: Stub, stores: Stores
) -> None:
    """A pass's NOTIFY carries its events when they fit, and serving processes take them from it
    instead of reading them back: they must be exactly the rows numbered. A pass too big for a
    notice names only its last sequence (the processes read the events)."""
    conn = await asyncpg.connect(stores.database_url)
    notices: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(pg_watch.NOTIFY_CHANNEL, lambda *a: notices.put_nowait(a[3]))
    try:
        w = await make_world(stub, locations=2, skus=30, on_hand=5)
        await stub.Reserve(api.ReserveRequest(lines=[pb.ReservationLine(
            sku=w.skus[0], location_id=w.locations[0], quantity=2)]))
        await stub.ImportStock(iter([api.ImportStockRequest(rows=[  # 60 changes in one pass
            api.ImportRow(sku=sku, location_id=loc, on_hand=7)
            for sku in w.skus for loc in w.locations])]))
        carried = bare = 0
        async with asyncio.timeout(WAIT_S):
            while not (carried and bare):
                last, events = pg_watch.parse_notice(await notices.get())
                if events is None:
                    bare += 1
                    continue
                carried += 1
                stored = await pg_watch.read_events(conn, events[0].seq - 1, len(events))
                assert events == stored.events
                assert last == events[-1].seq
    finally:
        await conn.close()


async def test_events_go_several_a_message_when_the_consumer_asks(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    """max_events_per_message: the events already waiting go together (an import's are numbered
    in one pass), in sequence order and as many as asked at most; they are the events a stream of
    one a message gets. Beyond 1,000 a message is refused."""
    w = await make_world(stub, locations=3, skus=4, on_hand=1)
    one, many = watch(channel, skus=w.skus), watch(channel, skus=w.skus, max_events_per_message=5)
    for r in (one, many):
        await r.until(lambda r: bool(r.heartbeats))  # at the head
    for on_hand in (9, 10):  # two imports of 12 rows
        await stub.ImportStock(iter([api.ImportStockRequest(rows=[
            api.ImportRow(sku=sku, location_id=loc, on_hand=on_hand)
            for sku in w.skus for loc in w.locations])]))

    def imported(r: Reader) -> list[tuple[int, int]]:
        return [(e.sequence, e.state.on_hand) for e in r.events if e.state.on_hand in (9, 10)]

    for r in (one, many):
        await r.until(lambda r: len(imported(r)) >= 24)
    assert imported(many) == imported(one)
    seqs = [s for s, _ in imported(many)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 24
    assert set(one.per_message) == {1}
    assert max(many.per_message) == 5, many.per_message
    for r in (one, many):
        r.call.cancel()
    err = await expect_error(watch(channel, max_events_per_message=1001).next(),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert "max_events_per_message" in str(err.details())


async def test_whatever_holds_the_sequencers_turn_too_long_is_named_and_then_it_goes_on(
    stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    """Passes take turns on the watch_state row, so anything that holds it (a pass stuck on a
    lock, a stray transaction) stops the events of every replica: after twice the statement
    timeout a WARNING names it, and once it lets go the changes made meanwhile are numbered."""
    caplog.set_level(logging.WARNING, logger="inventory_svc.app.sequencer")
    async with serve(settings_for(stores, pg_timeout_s=0.5)) as svc, \
            grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        stub = api_grpc.InventoryServiceStub(ch)
        w = await make_world(stub, locations=1, skus=1, on_hand=5)
        reader = watch(ch, skus=w.skus)
        await reader.until(lambda r: bool(r.heartbeats))
        holder = await asyncpg.connect(stores.database_url,
                                       server_settings={"application_name": "stray-transaction"})
        try:
            async with holder.transaction():
                await holder.execute("SELECT 1 FROM watch_state WHERE id = 1 FOR UPDATE")
                await stub.AdjustStock(api.AdjustStockRequest(
                    sku=w.skus[0], location_id=w.locations[0], delta=2,
                    reason=api.ADJUSTMENT_REASON_RECEIPT))

                async def named() -> bool:
                    return any("has been held elsewhere" in r.getMessage() for r in caplog.records)

                await eventually(named, within=WAIT_S, what="a WARNING naming the holder")
                # nothing numbered it meanwhile: its change still waits
                assert await holder.fetchval(
                    "SELECT count(*) FROM stock_changes WHERE sku = $1 AND on_hand = 7",
                    w.skus[0]) == 1
        finally:
            await holder.close()
        warning = next(r.getMessage() for r in caplog.records
                       if "has been held elsewhere" in r.getMessage())
        assert f"pid {holder.get_server_pid()} (stray-transaction)" in warning, warning
        assert "FOR UPDATE" in warning, warning
        await reader.until(lambda r: any(e.state.on_hand == 7 for e in r.events))
        reader.call.cancel()


async def test_an_idle_sequencer_pauses_long_and_any_commit_of_the_service_wakes_it(
    stores: Stores
) -> None:
    """After a few passes that find nothing, the sequencer pauses watch_idle_ms (an idle service
    used to make 100 passes a second). Here that pause is an hour, and the site is the test's
    own (no other sequencer numbers its changes), so only a wake-up can number a change within
    the test's wait. Two workers share the site; one leads and runs the sequencer. The leader's
    commits wake it in process: a transaction (AdjustStock), a reservation group's single
    statement (Reserve) and a group settle (CommitReservation). The other worker's commits wake
    it through Postgres (a NOTIFY). A change made meanwhile by hand is numbered by the same
    pass."""
    async with own_site(stores) as site:
        conf = site_settings(stores, site, watch_idle_ms=3_600_000.0)
        lock = leader_lock(uid("group"))
        async with serve(conf, background_lock=lock) as first, \
                serve(conf, background_lock=lock) as second:

            async def one_leads() -> bool:
                return [first.ctx.pg.on_commit is None, second.ctx.pg.on_commit is None].count(
                    False) == 1

            await eventually(one_leads, within=WAIT_S, what="one worker running the sequencer")
            leader, other = (first, second) if first.ctx.pg.on_commit else (second, first)
            on_commit = leader.ctx.pg.on_commit
            assert isinstance(getattr(on_commit, "__self__", None), Sequencer), on_commit
            sequencer = on_commit.__self__

            async def idle() -> bool:
                return sequencer.idle

            async with grpc.aio.insecure_channel(f"127.0.0.1:{leader.port}") as ch, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as other_ch:
                stub, other_stub = Stub(ch), Stub(other_ch)
                w = await make_world(stub, locations=1, skus=3, on_hand=5)
                sku, by_hand, theirs = w.skus
                loc = w.locations[0]
                await eventually(idle, within=WAIT_S, what="the world's changes numbered")
                reader = watch(ch, skus=w.skus)  # from the head: the world's events are before it
                await reader.until(lambda r: bool(r.heartbeats))

                conn = await asyncpg.connect(site.database_url)
                try:  # not through the service: no wake-up
                    await conn.execute("UPDATE stock SET on_hand = 9 WHERE sku = $1"
                                       " AND location_id = $2", by_hand, loc)
                finally:
                    await conn.close()
                await stub.AdjustStock(api.AdjustStockRequest(
                    sku=sku, location_id=loc, delta=2, reason=api.ADJUSTMENT_REASON_RECEIPT))
                await reader.until(lambda r: len(r.events) == 2)

                ways = leader.reservations.group.ways
                reserved = []
                for qty in (1, 2):  # the second goes in one statement: Postgres' clock is known
                    await eventually(idle, within=WAIT_S, what="the sequencer pausing again")
                    one_statement = ways["one_statement"]
                    reserved.append((await stub.Reserve(api.ReserveRequest(
                        lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)],
                        ttl_seconds=600))).reservation)
                    await reader.until(lambda r, n=qty: len(r.events) == 2 + n)
                assert ways["one_statement"] == one_statement + 1, ways

                await eventually(idle, within=WAIT_S, what="the sequencer pausing again")
                await stub.CommitReservation(
                    api.CommitReservationRequest(reservation_id=reserved[1].id))
                await reader.until(lambda r: len(r.events) == 5)

                for n, delta in enumerate((3, 4)):  # the other worker: twice, each after idle
                    await eventually(idle, within=WAIT_S, what="the sequencer pausing again")
                    await other_stub.AdjustStock(api.AdjustStockRequest(
                        sku=theirs, location_id=loc, delta=delta,
                        reason=api.ADJUSTMENT_REASON_RECEIPT))
                    await reader.until(lambda r, n=n: len(r.events) == 6 + n)
                reader.call.cancel()
                assert [(e.kind, e.state.sku, e.state.on_hand, e.state.reserved)
                        for e in reader.events] == [
                    (kind("ADJUSTMENT"), by_hand, 9, 0), (kind("RECEIPT"), sku, 7, 0),
                    (kind("RESERVE"), sku, 7, 1), (kind("RESERVE"), sku, 7, 3),
                    (kind("COMMIT"), sku, 5, 1), (kind("RECEIPT"), theirs, 8, 0),
                    (kind("RECEIPT"), theirs, 12, 0)]


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
    with contextlib.suppress(TimeoutError):
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
    r = watch(channel, skus=[quiet], heartbeat_ms=100, snapshot=True)
    start = await r.snapshot_done()
    await stub.SetStock(api.SetStockRequest(sku=busy, location_id=w.locations[0], on_hand=2))
    other = watch(channel, skus=[busy], after_sequence=start)
    await other.until(lambda rd: bool(rd.events))
    passed = other.events[0].sequence
    # the quiet stream's heartbeats move past the event it does not want
    await r.until(lambda rd: bool(rd.heartbeats) and rd.heartbeats[-1].sequence >= passed)
    assert not fresh(r.events, r.snapshot)
    assert r.heartbeats[-1].head_sequence >= passed
    err = await expect_error(watch(channel, heartbeat_ms=5).next(),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert "heartbeat_ms" in (err.details() or "")
    r.call.cancel()
    other.call.cancel()


async def test_a_location_turned_off_leaves_the_skus_available_to_promise(
    stub: Stub, channel: grpc.aio.Channel, service: Running
) -> None:
    w = await make_world(stub, locations=2, skus=1, on_hand=3)
    sku, (a, b) = w.skus[0], w.locations
    r = watch(channel, skus=[sku], snapshot=True)
    await r.snapshot_done()
    # one step a sequencer pass (a location changed within a pass is counted at its end)
    await numbered(service)
    for step in (
        lambda: stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
            store_location(b, active=False)])),
        lambda: stub.SetStock(api.SetStockRequest(sku=sku, location_id=a, on_hand=4)),
        lambda: stub.UpsertLocations(api.UpsertLocationsRequest(locations=[store_location(b)])),
        lambda: stub.SetStock(api.SetStockRequest(sku=sku, location_id=a, on_hand=5)),
    ):
        await step()  # a grpc.aio call starts when it is made: one at a time
        await numbered(service)
    await r.until(lambda rd: any(e.state.on_hand == 5 for e in rd.events))
    got = fresh(r.events, r.snapshot)
    assert [(e.state.on_hand, e.sku_available_after) for e in got] == [(4, 4), (5, 8)]


async def test_resume_on_another_replica_after_the_serving_one_is_killed(
    stores: Stores, stub: Stub
) -> None:
    root = Path(tempfile.mkdtemp(prefix="inventory-watch-"))
    a = ServiceProcess(stores.redis_url, stores.database_url, root)
    b = ServiceProcess(stores.redis_url, stores.database_url, root)
    try:
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        w = await make_world(stub, locations=2, skus=2, on_hand=1000)
        async with grpc.aio.insecure_channel(a.target) as ch_a, \
                grpc.aio.insecure_channel(b.target) as ch_b:
            first = watch(ch_a, heartbeat_ms=100)  # every event from now, through replica A
            await first.until(lambda rd: bool(rd.heartbeats or rd.events))
            start = (first.heartbeats[0].sequence if first.heartbeats
                     else first.events[0].sequence - 1)

            async def workload() -> None:  # through the in-process service, while A dies
                for i in range(60):
                    sku, loc = w.skus[i % 2], w.locations[i // 2 % 2]
                    res = (await stub.Reserve(api.ReserveRequest(lines=[
                        pb.ReservationLine(sku=sku, location_id=loc, quantity=1)]))).reservation
                    if i % 3 == 0:
                        await stub.CommitReservation(
                            api.CommitReservationRequest(reservation_id=res.id))
                    elif i % 3 == 1:
                        await stub.ReleaseReservation(
                            api.ReleaseReservationRequest(reservation_id=res.id))
                    else:
                        await stub.AdjustStock(api.AdjustStockRequest(
                            sku=sku, location_id=loc, delta=-1,
                            reason=api.ADJUSTMENT_REASON_DAMAGE))

            load = asyncio.create_task(workload())
            await first.until(lambda rd: len(rd.events) >= 20)
            await asyncio.to_thread(a.kill)
            with pytest.raises(grpc.aio.AioRpcError):
                await first.until(lambda rd: False)
            await load
            await stub.SetStock(api.SetStockRequest(
                sku=w.skus[0], location_id=w.locations[0], on_hand=5))  # the last change
            last = first.events[-1].sequence
            second = watch(ch_b, after_sequence=last)
            await second.until(lambda rd: any(
                e.kind == kind("COUNT") and e.state.on_hand == 5 for e in rd.events))
            # B shut down in order: its streams end at once, UNAVAILABLE, saying how far they got
            b.terminate()
            err = await expect_error(second.until(lambda rd: False), grpc.StatusCode.UNAVAILABLE)
            assert "shutting down" in (err.details() or "")
        events = first.events + second.events
        # nothing missing, nothing twice: every sequence after the start, in order
        assert [e.sequence for e in events] == list(range(start + 1, events[-1].sequence + 1))
        mine = [e for e in events if e.state.sku in w.skus]
        counted = Counter(k for k, _, _ in by_kind(mine))
        assert (counted["RESERVE"], counted["COMMIT"], counted["RELEASE"],
                counted["ADJUSTMENT"]) == (60, 20, 20, 20), counted
        assert applied({}, mine) == await levels(stub, w)
    finally:
        a.kill()
        b.kill()
        shutil.rmtree(root, ignore_errors=True)


async def test_the_example_cache_follows_the_stock(stub: Stub, service: Running) -> None:
    spec = importlib.util.spec_from_file_location("watch_cache", REPO / "examples" / "watch_cache.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclasses look their module up by name
    spec.loader.exec_module(example)
    w = await make_world(stub, locations=2, skus=2, on_hand=10)
    changed = asyncio.Event()
    cache = example.AvailabilityCache(on_change=lambda *_: changed.set())
    follower = asyncio.create_task(example.follow(f"127.0.0.1:{service.port}", cache, skus=w.skus))
    try:
        res = (await stub.Reserve(api.ReserveRequest(lines=[
            pb.ReservationLine(sku=w.skus[0], location_id=w.locations[0], quantity=4)]))).reservation
        await stub.CommitReservation(api.CommitReservationRequest(reservation_id=res.id))
        await stub.SetStock(api.SetStockRequest(sku=w.skus[1], location_id=w.locations[1],
                                                on_hand=3))
        want = await levels(stub, w)

        def synced() -> bool:
            return {k: (r.on_hand, r.reserved) for k, r in cache.rows.items()} == want

        async with asyncio.timeout(WAIT_S):
            while not synced():
                await changed.wait()
                changed.clear()
        assert cache.rows[(w.skus[0], w.locations[0])].available == 6
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


async def test_the_watch_command_prints_events_as_lines(stub: Stub, service: Running) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=10)
    sku, loc = w.skus[0], w.locations[0]
    head = await numbered(service)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inventory_svc.cli", "watch", "--target",
        f"127.0.0.1:{service.port}", "--sku", sku, "--from", str(head), "--json", "--count", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO)
    await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=12))
    await stub.Reserve(api.ReserveRequest(lines=[
        pb.ReservationLine(sku=sku, location_id=loc, quantity=2)], order_ref="cli-1"))
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(x) for x in out.decode().splitlines()]
    assert [(x["event"]["kind"], x["event"]["state"].get("onHand"),
             x["event"]["state"].get("reserved", "0")) for x in lines] == [
        ("STOCK_EVENT_KIND_COUNT", "12", "0"), ("STOCK_EVENT_KIND_RESERVE", "12", "2")]
    assert lines[1]["event"]["orderRefs"] == ["cli-1"]
    # and as text, from the same place, asking for several events a message (both are numbered
    # by now, so they come in one): still a line each
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inventory_svc.cli", "watch", "--target",
        f"127.0.0.1:{service.port}", "--sku", sku, "--from", str(head), "--count", "2",
        "--per-message", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    text = out.decode().splitlines()
    assert text[0].startswith("seq=") and f" COUNT {sku}@{loc} on_hand=12 (+2)" in text[0], text
    assert f" RESERVE {sku}@{loc} on_hand=12 (+0) reserved=2 (+2)" in text[1], text
    assert "orders=cli-1" in text[1] and "lag=" in text[1]


async def numbered(service: Running) -> int:
    """The last sequence, once every change committed so far has one (a pass of the sequencer
    run here, until nothing is left to number)."""
    pool = service.ctx.pg.pool
    async with asyncio.timeout(WAIT_S):
        while await pool.fetchval("SELECT count(*) FROM stock_changes"):
            await Sequencer(service.ctx).run_once()
    return int(await pool.fetchval("SELECT last_seq FROM watch_state"))


# ---- a service of its own: keys, scopes, and a small buffer ------------------------------------
KEYS = "w-erp:erp,w-shop:shop,w-reader:reader,w-pos:pos:WPOS-*"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def keyed(stores: Stores) -> AsyncIterator[Running]:
    async with serve(settings_for(stores, api_keys=KEYS, watch_buffer=20)) as running:
        yield running


def as_(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


async def test_the_stream_follows_the_principals_rules(keyed: Running) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keyed.port}") as ch:
        inv = api_grpc.InventoryServiceStub(ch)
        watcher = wp_grpc.WatchServiceStub(ch)
        own, other = f"WPOS-{uid('S')}", uid("OTHER")
        await inv.UpsertLocations(api.UpsertLocationsRequest(locations=[
            store_location(own), store_location(other)]), metadata=as_("w-erp"))
        sku = uid("SKU")

        def open_(key: str, **kw: object) -> Reader:
            return Reader(watcher.WatchStock(wp.WatchStockRequest(skus=[sku], **kw),
                                             metadata=as_(key) if key else ()))

        await expect_error(open_("").next(), grpc.StatusCode.UNAUTHENTICATED)
        await expect_error(open_("nope").next(), grpc.StatusCode.UNAUTHENTICATED)
        await expect_error(open_("w-pos", location_ids=[other]).next(),
                           grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(open_("w-shop", channel=pb.CHANNEL_POS).next(),
                           grpc.StatusCode.PERMISSION_DENIED)
        pos = open_("w-pos", snapshot=True, heartbeat_ms=100)
        reader = open_("w-reader", snapshot=True)
        for r in (pos, reader):
            await r.snapshot_done()
        for loc in (own, other):
            await inv.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=4),
                               metadata=as_("w-erp"))
        await reader.until(lambda rd: len(rd.events) >= 2)
        last = reader.events[-1].sequence
        await pos.until(lambda rd: bool(rd.heartbeats) and rd.heartbeats[-1].sequence >= last)
        # the store's terminal sees its own store only, and no network-wide total
        assert [(e.state.location_id, e.sku_available_after) for e in pos.events] == [(own, 0)]
        assert [(e.state.location_id, e.sku_available_after) for e in reader.events] == [
            (own, 4), (other, 8)]
        for r in (pos, reader):
            r.call.cancel()


async def test_a_consumer_that_stops_reading_is_cut_off_and_nothing_else_is(
    keyed: Running, stores: Stores
) -> None:
    assert keyed.watch is not None
    hub = keyed.watch.hub
    target = f"127.0.0.1:{keyed.port}"
    # a client that takes little into its buffers (no BDP-grown windows): it stops reading
    # after one message, and the service sees its writes wait soon after
    async with grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)]) as slow_ch, \
            grpc.aio.insecure_channel(target) as ch:
        inv = api_grpc.InventoryServiceStub(ch)
        loc = uid("LS")
        await inv.UpsertLocations(api.UpsertLocationsRequest(
            locations=[store_location(loc)]), metadata=as_("w-erp"))
        skus = [uid("SKU") for _ in range(25)]
        slow = Reader(wp_grpc.WatchServiceStub(slow_ch).WatchStock(
            wp.WatchStockRequest(skus=skus, heartbeat_ms=100), metadata=as_("w-reader")))
        fast = Reader(wp_grpc.WatchServiceStub(ch).WatchStock(
            wp.WatchStockRequest(skus=skus, heartbeat_ms=100), metadata=as_("w-reader")))
        await slow.next()  # a heartbeat: it is at the head; it reads nothing more
        await fast.until(lambda rd: bool(rd.heartbeats))
        streams = len(hub.streams)
        want = [2**62]  # the fast consumer reads all along (in a task), until it has these
        reading = asyncio.create_task(fast.until(lambda rd: len(rd.events) >= want[0]))

        async def rows(n: int) -> AsyncIterator[api.ImportStockRequest]:
            yield api.ImportStockRequest(rows=[
                api.ImportRow(sku=s, location_id=loc, on_hand=n) for s in skus])

        rounds = 0
        while len(hub.streams) == streams:  # until the service lets the slow one go
            rounds += 1
            assert rounds <= 400, "the slow consumer was never cut off"
            await inv.ImportStock(rows(rounds), metadata=as_("w-erp"))
            # the rest of the service answers as ever meanwhile
            await inv.GetAvailability(api.GetAvailabilityRequest(skus=skus[:1]),
                                      metadata=as_("w-reader"))
        # the fast consumer has every event of every round
        want[0] = rounds * len(skus)
        await reading
        assert [e.state.on_hand for e in fast.events] == [
            n for n in range(1, rounds + 1) for _ in skus]
        # the slow one gets what was on its way, then the reason, and where it had got to
        err = await expect_error(slow.until(lambda rd: False), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "watch/buffer" in [v.subject for d in details(err)
                                  for v in getattr(d, "violations", [])]
        assert "resume with after_sequence" in (err.details() or "")
        got = [e.sequence for e in slow.events]
        assert got == sorted(set(got)) and len(got) < rounds * len(skus)
        fast.call.cancel()


async def test_a_transaction_too_large_for_a_pass_in_time_is_still_numbered(
        stores: Stores) -> None:
    # A transaction's changes are numbered in one pass. With a statement timeout below what
    # numbering 100k changes takes (~2 s here), the sequencer's passes are cut off until one is
    # given long enough (app/sequencer.py): the stream must not stop at them. The whole service
    # has that timeout, so the changes are made in SQL: through the service, on a busy box, its
    # start and its ImportStock failed at such timeouts (0.2 and 0.5 s), not the passes.
    async with own_site(stores) as site:
        svc = ServiceProcess(site.redis_url, site.database_url, site.root, pg_timeout_s=1.0)
        await asyncio.to_thread(svc.start)
        conn = await asyncpg.connect(site.database_url)
        try:
            async with grpc.aio.insecure_channel(svc.target) as ch:
                loc = uid("L")
                await api_grpc.InventoryServiceStub(ch).UpsertLocations(
                    api.UpsertLocationsRequest(locations=[store_location(loc)]))
            await conn.execute(
                "INSERT INTO stock (sku, location_id, on_hand)"
                " SELECT 'S-' || i, $1, 0 FROM generate_series(1, 100000) i", loc)
            changed = await conn.execute(  # one transaction, 100k changes
                "UPDATE stock SET on_hand = 1, version = version + 1 WHERE location_id = $1", loc)
            assert changed == "UPDATE 100000"

            async def numbered() -> bool:
                return await conn.fetchval("SELECT count(*) FROM stock_changes") == 0

            await eventually(numbered, within=120, what="the 100k changes numbered")
            assert await conn.fetchval(
                "SELECT count(*) FROM stock_events WHERE location_id = $1", loc) == 100_000
        finally:
            await conn.close()
            svc.kill()


async def test_a_bulk_load_is_planned_for_when_the_queues_statistics_say_it_is_empty(
        stub: Stub, channel: grpc.aio.Channel, service: Running) -> None:
    # The change queue's statistics are taken when it is (nearly) empty: by the sequencer's own
    # VACUUM of it, or autovacuum's. Planned from them, a pass joins as if one change waited,
    # quadratic in the changes (98k took 33 s; benchmarks/watch_pass.py). Migration 0009: a pass
    # of 500 or more changes analyzes the queue first and is planned again.
    pool = service.ctx.pg.pool
    w = await make_world(stub, locations=2, skus=1, on_hand=1)
    reader = watch(channel, location_ids=w.locations)
    await reader.until(lambda r: bool(r.heartbeats))  # the world's changes are numbered
    await pool.execute("ALTER TABLE stock_changes SET (autovacuum_enabled = false)")
    try:
        # Such statistics, made sure of: taken while the queue held one change (ours, rolled
        # back; the statistics stay) over a page that stays.
        async with pool.acquire() as conn:
            ours = conn.transaction()
            await ours.start()
            await conn.execute("UPDATE stock SET version = version + 1 WHERE sku = $1", w.skus[0])
            await conn.execute("ANALYZE stock_changes")
            await ours.rollback()
        pages, tuples, analyzed = await pool.fetchrow(
            "SELECT c.relpages, c.reltuples, s.analyze_count FROM pg_class c"
            " JOIN pg_stat_user_tables s ON s.relid = c.oid"
            " WHERE c.oid = 'stock_changes'::regclass")
        assert pages > 0 and tuples < 50, (pages, tuples)
        rows = [api.ImportRow(sku=f"{uid('S')}-{i}", location_id=w.locations[i % 2], on_hand=3)
                for i in range(4_000)]
        await stub.ImportStock(iter([api.ImportStockRequest(rows=rows, reason="erp load")]))
        await reader.until(lambda r: sum(e.state.on_hand == 3 for e in r.events) == 4_000)
        assert await pool.fetchval(
            "SELECT analyze_count FROM pg_stat_user_tables"
            " WHERE relid = 'stock_changes'::regclass") > analyzed, "the pass did not look"
    finally:
        await pool.execute("ALTER TABLE stock_changes RESET (autovacuum_enabled)")
        reader.call.cancel()
