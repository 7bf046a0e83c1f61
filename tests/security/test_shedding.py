"""Overload: calls that would wait past the queue budget are refused at once, and change nothing."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from tests.conftest import Stores, store_location, uid
from tests.faults.harness import eventually
from tests.security.kit import Entry, service_with

CALLS = 20
# how long the test holds the service's event loop: the overload it injects (the budget is 50 ms)
STALL_S = 0.3


def _retry_delay(err: grpc.RpcError) -> float:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    raise AssertionError("no RetryInfo")


async def test_calls_arriving_while_the_loop_is_stalled_are_shed_and_change_nothing(
        stores: Stores, tmp_path: Path) -> None:
    async with service_with(stores, tmp_path, [Entry("ops", "admin", "k-erp")],
                            queue_budget_ms=50) as svc:
        target = f"127.0.0.1:{svc.port}"
        meta = (("x-api-key", "k-erp"),)
        loc, sku = uid("L"), uid("SKU")
        # A synchronous client on threads: its calls reach the service while the service's
        # event loop (this one) is held, as calls queue on an overloaded server.
        with grpc.insecure_channel(target) as ch:
            stub = api_grpc.InventoryServiceStub(ch)
            # (a synchronous call on this thread would wait for the loop it blocks)
            await asyncio.to_thread(
                stub.UpsertLocations, api.UpsertLocationsRequest(locations=[store_location(loc)]),
                metadata=meta)
            await asyncio.to_thread(
                stub.SetStock, api.SetStockRequest(sku=sku, location_id=loc, on_hand=1_000),
                metadata=meta)
            request = api.ReserveRequest(lines=[pb.ReservationLine(sku=sku, location_id=loc,
                                                                   quantity=1)])
            started = threading.Event()
            calls: list[Future[api.ReserveResponse]] = []

            def fire() -> None:
                calls.extend(stub.Reserve.future(request, metadata=meta) for _ in range(CALLS))
                started.set()

            threading.Thread(target=fire, daemon=True).start()
            started.wait(60)  # blocks this loop: the service cannot look at the calls yet
            time.sleep(STALL_S)  # noqa: ASYNC251  (the stall itself, on purpose)
            outcomes: list[grpc.StatusCode] = []
            delays: list[float] = []
            for call in calls:
                try:
                    await asyncio.to_thread(call.result, 60)
                    outcomes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    outcomes.append(err.code())
                    if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        delays.append(_retry_delay(err))
            shed = outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
            ok = outcomes.count(grpc.StatusCode.OK)
            assert shed >= 1, f"nothing was shed: {outcomes}"
            assert shed + ok == CALLS, [o for o in outcomes if o is not grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert all(d > 0 for d in delays)
            # once the loop keeps up again, calls are served (retried as RetryInfo says, should
            # the box itself be busy enough to stall the loop past the budget)
            for _ in range(100):
                try:
                    await asyncio.to_thread(stub.Reserve, request, metadata=meta)
                    break
                except grpc.RpcError as err:
                    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err
                    await asyncio.sleep(_retry_delay(err))
            else:
                raise AssertionError("never served again after the stall")
            got = await asyncio.to_thread(stub.GetAvailability, api.GetAvailabilityRequest(
                skus=[sku], location_ids=[loc]), metadata=meta)
            assert got.items[0].total_reserved == ok + 1, "a shed call changed stock"


async def test_the_arrival_probe_times_calls_through_a_socket_only_the_service_user_reaches(
        stores: Stores, tmp_path: Path) -> None:
    """The probe behind the queue-budget shedding calls the service's own health check while
    calls come, through a Unix socket in a directory of mode 0700, removed when it stops."""
    async with service_with(stores, tmp_path, [Entry("ops", "admin", "k-erp")],
                            queue_budget_ms=50) as svc:
        probe = svc.probe
        assert probe is not None
        folder = Path(probe.address.removeprefix("unix:")).parent
        assert folder.stat().st_mode & 0o777 == 0o700
        assert folder.stat().st_uid == os.getuid()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            stub = api_grpc.InventoryServiceStub(ch)

            async def probed() -> bool:
                await stub.ListLocations(api.ListLocationsRequest(),
                                         metadata=(("x-api-key", "k-erp"),))
                # (an idle spell between two calls clears the last probe's time: no calls, no
                # queue; the next probe measures again)
                return probe.rounds > 0 and 0 < probe.wait() < 5.0
            await eventually(probed, within=30, what="a probe timed while calls come")
    assert not folder.exists()


async def test_no_probe_and_no_socket_when_shedding_is_off(stores: Stores, tmp_path: Path) -> None:
    async with service_with(stores, tmp_path, [Entry("ops", "admin", "k-erp")],
                            queue_budget_ms=0) as svc:
        assert svc.probe is None
