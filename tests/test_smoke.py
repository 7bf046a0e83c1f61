from __future__ import annotations

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from tests.conftest import make_world
from tests.invariants import assert_invariants


async def test_reserve_then_commit(stub: api_grpc.InventoryServiceStub, service) -> None:
    w = await make_world(stub)
    res = await stub.Reserve(api.ReserveRequest(lines=[
        {"sku": w.skus[0], "location_id": w.locations[0], "quantity": 3}]))
    assert res.reservation.status == 1
    out = await stub.CommitReservation(api.CommitReservationRequest(
        reservation_id=res.reservation.id))
    assert out.movements[0].delta == -3
    await assert_invariants(service, w.skus)
