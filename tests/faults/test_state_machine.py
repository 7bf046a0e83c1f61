"""Model-based: a Hypothesis state machine drives the real service over real gRPC and compares
every answer and every availability read with the pure model of DESIGN §3 (tests/faults/model.py),
with expiry (Postgres time jumped) and Redis flushed between steps."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running, serve
from tests.conftest import Stores, store_location, uid
from tests.faults.harness import check_all, own_site_sync, site_settings
from tests.faults.model import Model

T = TypeVar("T")
SKUS, LOCS = 2, 3


class ThreadedService:
    """The service on an event loop of its own thread, so a synchronous test can drive it."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.svc: Running | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            async with serve(self.settings) as svc:
                self.svc = svc
                self._ready.set()
                await self._stop.wait()
        self.loop.run_until_complete(main())

    def __enter__(self) -> ThreadedService:
        self._thread.start()
        assert self._ready.wait(120), "service did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)


def code_of(call: Any) -> tuple[str, Any]:
    try:
        return "OK", call()
    except grpc.RpcError as err:
        return err.code().name, None  # type: ignore[attr-defined]


class InventoryMachine(RuleBasedStateMachine):
    service: ThreadedService
    stub: api_grpc.InventoryServiceStub

    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        # fresh names per example, always in the same order (the draws must not depend on them)
        run = uid("m")
        self.skus = [f"{run}-S{i}" for i in range(SKUS)]
        self.locs = [f"{run}-L{i}" for i in range(LOCS)]

    @initialize(safety=st.lists(st.integers(0, 2), min_size=LOCS, max_size=LOCS),
                on_hand=st.lists(st.integers(0, 8), min_size=SKUS * LOCS, max_size=SKUS * LOCS))
    def world(self, safety: list[int], on_hand: list[int]) -> None:
        self.stub.UpsertLocations(api.UpsertLocationsRequest(locations=[
            store_location(loc, default_safety_stock=s) for loc, s in zip(self.locs, safety,
                                                                           strict=True)]))
        for loc, s in zip(self.locs, safety, strict=True):
            self.model.default_safety[loc] = s
        # the last location starts without stock rows: writes there create them
        for i, (sku, loc) in enumerate((s, x) for s in self.skus for x in self.locs[:-1]):
            self.stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=on_hand[i]))
            assert self.model.count((sku, loc), on_hand[i], None) == "OK"

    # ---- helpers -------------------------------------------------------------------------------
    def expect(self, want: str, call: Any) -> Any:
        got, out = code_of(call)
        assert got == want, f"service said {got}, the model {want}"
        return out

    keys = st.tuples(st.integers(0, SKUS - 1), st.integers(0, LOCS - 1))

    def key(self, k: tuple[int, int]) -> tuple[str, str]:
        return self.skus[k[0]], self.locs[k[1]]

    # ---- reservations --------------------------------------------------------------------------
    @rule(target=reservations, lines=st.dictionaries(keys, st.integers(1, 4), min_size=1,
                                                     max_size=3), pos=st.booleans())
    def reserve(self, lines: dict[tuple[int, int], int], pos: bool) -> Any:
        named = {self.key(k): q for k, q in lines.items()}
        code, out = code_of(lambda: self.stub.Reserve(api.ReserveRequest(
            lines=[pb.ReservationLine(sku=s, location_id=loc, quantity=q)
                   for (s, loc), q in named.items()], ttl_seconds=600,
            channel=pb.CHANNEL_POS if pos else pb.CHANNEL_WEB)))
        res_id = out.reservation.id if out else ""
        want = self.model.reserve(res_id, named, pos)
        # a missing row and a short line in one call: which is told depends on the hash slots
        assert code == want or {code, want} == self.model.both_wrong(named, pos), (code, want)
        return multiple(res_id) if code == "OK" else multiple()

    @rule(res=reservations)
    def extend(self, res: str) -> None:
        self.expect(self.model.extend(res), lambda: self.stub.ExtendReservation(
            api.ExtendReservationRequest(reservation_id=res, ttl_seconds=600)))

    @rule(res=reservations, part=st.booleans(), data=st.data())
    def release(self, res: str, part: bool, data: st.DataObject) -> None:
        lines: dict[tuple[str, str], int] = {}
        held = self.model.reservations[res].lines
        if part:
            k = data.draw(st.sampled_from(list(held)))
            lines = {k: data.draw(st.integers(1, max(1, held[k] + 1)))}
        want = self.model.release(res, lines)
        self.expect(want, lambda: self.stub.ReleaseReservation(api.ReleaseReservationRequest(
            reservation_id=res, lines=[pb.ReservationLine(sku=s, location_id=loc, quantity=q)
                                       for (s, loc), q in lines.items()])))

    @rule(res=reservations)
    def commit(self, res: str) -> None:
        self.expect(self.model.commit(res), lambda: self.stub.CommitReservation(
            api.CommitReservationRequest(reservation_id=res)))

    @rule(res=consumes(reservations))
    def time_jumps_past_expiry(self, res: str) -> None:
        if not self.model.active(res):
            return
        # Postgres' expires_at is the authoritative clock: move it, the sweeper does the rest
        self.service.run(self.service.svc.ctx.pg.pool.execute(  # type: ignore[union-attr]
            "UPDATE reservations SET expires_at = now() - interval '1 second' WHERE id = $1",
            res))
        self.model.expire(res)
        deadline = time.monotonic() + 10
        while True:
            got = self.stub.GetReservation(api.GetReservationRequest(reservation_id=res))
            if got.reservation.status == pb.RESERVATION_STATUS_EXPIRED and self._matches():
                return
            assert time.monotonic() < deadline, "the sweeper did not expire it"
            time.sleep(0.02)

    # ---- stock ---------------------------------------------------------------------------------
    @rule(loc=st.integers(0, LOCS - 1), items=st.dictionaries(st.integers(0, SKUS - 1),
                                                              st.integers(1, 4), min_size=1))
    def sell(self, loc: int, items: dict[int, int]) -> None:
        named = {self.skus[s]: q for s, q in items.items()}
        keyed = {(s, self.locs[loc]): q for s, q in named.items()}
        both = self.model.both_wrong(keyed, True)
        want = self.model.sell(self.locs[loc], named)
        code, _ = code_of(lambda: self.stub.Sell(api.SellRequest(
            location_id=self.locs[loc], items=[
                api.SkuQuantity(sku=s, quantity=q) for s, q in named.items()])))
        assert code == want or {code, want} == both, (code, want)

    @rule(loc=st.integers(0, LOCS - 1), items=st.dictionaries(st.integers(0, SKUS - 1),
                                                              st.integers(1, 4), min_size=1))
    def return_items(self, loc: int, items: dict[int, int]) -> None:
        named = {self.skus[s]: q for s, q in items.items()}
        self.expect(self.model.return_items(self.locs[loc], named), lambda: self.stub.ReturnItems(
            api.ReturnItemsRequest(location_id=self.locs[loc], unmatched=True, items=[
                api.SkuQuantity(sku=s, quantity=q) for s, q in named.items()])))

    @rule(k=keys, delta=st.integers(-6, 6).filter(bool))
    def adjust(self, k: tuple[int, int], delta: int) -> None:
        sku, loc = self.key(k)
        self.expect(self.model.adjust((sku, loc), delta), lambda: self.stub.AdjustStock(
            api.AdjustStockRequest(sku=sku, location_id=loc, delta=delta,
                                   reason=api.ADJUSTMENT_REASON_CORRECTION)))

    @rule(k=keys, on_hand=st.integers(0, 10), cas=st.sampled_from(["none", "right", "wrong"]))
    def count(self, k: tuple[int, int], on_hand: int, cas: str) -> None:
        key = self.key(k)
        row = self.model.stock.get(key)
        expected = None if cas == "none" else (row.version if row else 0) + (cas == "wrong")
        self.expect(self.model.count(key, on_hand, expected), lambda: self.stub.SetStock(
            api.SetStockRequest(sku=key[0], location_id=key[1], on_hand=on_hand,
                                expected_version=expected)))

    @rule(sku=st.integers(0, SKUS - 1), src=st.integers(0, LOCS - 1), dst=st.integers(0, LOCS - 1),
          qty=st.integers(1, 5))
    def transfer(self, sku: int, src: int, dst: int, qty: int) -> None:
        if src == dst:
            return
        s, a, b = self.skus[sku], self.locs[src], self.locs[dst]
        self.expect(self.model.transfer(s, a, b, qty), lambda: self.stub.TransferStock(
            api.TransferStockRequest(sku=s, from_location_id=a, to_location_id=b, quantity=qty)))

    @rule(k=keys, safety=st.one_of(st.none(), st.integers(0, 3)))
    def safety_stock(self, k: tuple[int, int], safety: int | None) -> None:
        key = self.key(k)
        self.expect(self.model.set_safety(key, safety), lambda: self.stub.SetSafetyStock(
            api.SetSafetyStockRequest(sku=key[0], location_id=key[1], safety_stock=safety)))

    @rule()
    def redis_flushed(self) -> None:
        self.service.run(self.service.svc.ctx.redis.client.flushall())  # type: ignore[union-attr]

    # ---- what must hold after every step ---------------------------------------------------------
    def _levels(self) -> dict[tuple[str, str], tuple[int, int, int, int]]:
        out = self.stub.GetAvailability(api.GetAvailabilityRequest(
            skus=self.skus, location_ids=self.locs))
        return {(lv.sku, lv.location_id): (lv.on_hand, lv.reserved, lv.safety_stock, lv.available)
                for item in out.items for lv in item.levels}

    def _model_levels(self) -> dict[tuple[str, str], tuple[int, int, int, int]]:
        m = self.model
        return {k: (r.on_hand, r.reserved, m.safety(k), m.available(k, False))
                for k, r in m.stock.items()}

    def _matches(self) -> bool:
        return self._levels() == self._model_levels()

    @invariant()
    def redis_reads_equal_the_model(self) -> None:
        assert self._levels() == self._model_levels()

    def teardown(self) -> None:
        svc = self.service.svc
        assert svc is not None
        self.service.run(check_all(svc.ctx.pg.pool, svc.ctx.redis.client, self.skus))


def test_service_follows_the_model(stores: Stores, soak: bool) -> None:
    with own_site_sync(stores) as site, ThreadedService(site_settings(
            stores, site, sweep_interval_s=0.05, reconcile_interval_s=3600)) as service:
        channel = grpc.insecure_channel(f"127.0.0.1:{service.svc.port}")  # type: ignore[union-attr]
        InventoryMachine.service = service
        InventoryMachine.stub = api_grpc.InventoryServiceStub(channel)
        try:
            run_state_machine_as_test(InventoryMachine, settings=settings(
                max_examples=500 if soak else 120, stateful_step_count=30, deadline=None,
                suppress_health_check=list(HealthCheck), derandomize=not soak,
                database=None))
        finally:
            channel.close()

