import asyncio, collections
import grpc
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from tests.conftest import make_world

async def test_x(service) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") for _ in range(8)]
    stubs = [api_grpc.InventoryServiceStub(c) for c in channels]
    w = await make_world(stubs[0], locations=1, skus=3, on_hand=1)
    msgs = collections.Counter()
    for sku in w.skus:
        async def reserve(i, sku=sku):
            try:
                await stubs[i % 8].Reserve(api.ReserveRequest(lines=[pb.ReservationLine(sku=sku, location_id=w.locations[0], quantity=1)]))
                return "OK"
            except grpc.aio.AioRpcError as err:
                return f"{err.code()} {err.details()[:150]}"
        for c in await asyncio.gather(*(reserve(i) for i in range(200))):
            msgs[c.split(':')[0] if 'insufficient' in c else c] += 1
    print(msgs)
