"""The Python client example (examples/python/reserve_cart.py) runs as a newcomer would run it,
against a live service: availability, a refusal with its details decoded, a reservation retried
under the same idempotency key, the key refused for another cart, and the commit."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.server import Running
from tests.conftest import make_world

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python" / "reserve_cart.py"


async def test_python_example_against_a_live_service(
    stub: api_grpc.InventoryServiceStub, service: Running
) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=10)
    sku, loc = w.skus[0], w.locations[0]
    # a process of its own (as a user runs it), so the service's event loop keeps serving
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), "--target", f"127.0.0.1:{service.port}", "--sku", sku,
        "--location", loc, "--quantity", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text
    assert f"available {sku}@{loc}: 10" in text
    # the refusal's google.rpc details, decoded: PreconditionFailure and InsufficientStock
    assert "refused as expected:\nFAILED_PRECONDITION" in text
    assert f"precondition INSUFFICIENT_STOCK on {sku}@{loc}" in text
    assert f"short {sku}@{loc}: requested 1000000000, available 10" in text
    # the same key again is the same reservation; another cart under it is ALREADY_EXISTS
    assert "(same reservation: True)" in text
    assert "key reused for another cart:\nALREADY_EXISTS" in text
    assert "reason IDEMPOTENCY_KEY_REUSED" in text
    assert f"{sku}@{loc} -2" in text
    got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku], location_ids=[loc]))
    assert (got.items[0].total_on_hand, got.items[0].total_reserved) == (8, 0), text
