"""A cart backend's round trip with inventory-svc, in plain synchronous gRPC.

It reads availability, reserves a cart under an idempotency key (retrying with the SAME key when
the outcome is unknown or the service asks for a retry), shows what a refusal carries (the
google.rpc details the service sends), and commits the cart.

    pip install inventory-svc            # or, in a checkout: pip install -e .
    inventory-svc serve --demo &         # a service with the demo network
    python examples/python/reserve_cart.py --target 127.0.0.1:50051 --sku SKU-000001 --location WH-WAW

The stubs are the installed package `inventory.v1` (compiled from protos/ at install time); the
error details come from googleapis-common-protos and grpcio-status, both dependencies of it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2 as rpc
from grpc_status import rpc_status

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc

R = TypeVar("R")

# UNAVAILABLE: nothing was confirmed. DEADLINE_EXCEEDED: the outcome is unknown (the call may
# have committed). ABORTED: the same key is still running, or a compare-and-set lost. CANCELLED
# (this client cancels nothing): a replica stopped as the call reached it, and it never ran. Each
# is retried with the same idempotency key: the service runs the call at most once and answers a
# repeat with the first answer. RESOURCE_EXHAUSTED is retried only when it says when (RetryInfo:
# a rate quota); a size limit or a quota of units stays refused.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}


@dataclass
class ErrorDetails:
    """The google.rpc details of a refusal, decoded (DESIGN §4 of the service lists them)."""

    code: grpc.StatusCode
    message: str
    bad_fields: list[tuple[str, str]] = field(default_factory=list)  # BadRequest
    preconditions: list[tuple[str, str, str]] = field(default_factory=list)  # PreconditionFailure
    short_lines: list[tuple[str, str, int, int]] = field(default_factory=list)  # InsufficientStock
    quotas: list[tuple[str, str]] = field(default_factory=list)  # QuotaFailure
    resource: tuple[str, str] | None = None  # ResourceInfo (NOT_FOUND)
    reason: str = ""  # ErrorInfo (ALREADY_EXISTS: IDEMPOTENCY_KEY_REUSED)
    retry_after_s: float | None = None  # RetryInfo

    def __str__(self) -> str:
        parts = [f"{self.code.name}: {self.message}"]
        parts += [f"  field {f}: {d}" for f, d in self.bad_fields]
        parts += [f"  precondition {t} on {s}: {d}" for t, s, d in self.preconditions]
        parts += [f"  short {sku}@{loc}: requested {r}, available {a}"
                  for sku, loc, r, a in self.short_lines]
        parts += [f"  quota {s}: {d}" for s, d in self.quotas]
        if self.resource:
            parts.append(f"  resource {self.resource[0]} {self.resource[1]!r}")
        if self.reason:
            parts.append(f"  reason {self.reason}")
        if self.retry_after_s is not None:
            parts.append(f"  retry after {self.retry_after_s:g} s")
        return "\n".join(parts)


def error_details(err: grpc.RpcError) -> ErrorDetails:
    """Decode the rich status (grpc-status-details-bin) of a failed call."""
    call: Any = err  # a failed call is both a grpc.RpcError and a grpc.Call
    out = ErrorDetails(call.code(), call.details() or "")
    status = rpc_status.from_call(call)
    for detail in status.details if status else ():
        if detail.Is(rpc.BadRequest.DESCRIPTOR):
            bad = rpc.BadRequest()
            detail.Unpack(bad)
            out.bad_fields += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(rpc.PreconditionFailure.DESCRIPTOR):
            pf = rpc.PreconditionFailure()
            detail.Unpack(pf)
            out.preconditions += [(v.type, v.subject, v.description) for v in pf.violations]
        elif detail.Is(pb.InsufficientStock.DESCRIPTOR):
            short = pb.InsufficientStock()
            detail.Unpack(short)
            out.short_lines += [(x.sku, x.location_id, x.requested, x.available)
                                for x in short.lines]
        elif detail.Is(rpc.QuotaFailure.DESCRIPTOR):
            qf = rpc.QuotaFailure()
            detail.Unpack(qf)
            out.quotas += [(v.subject, v.description) for v in qf.violations]
        elif detail.Is(rpc.ResourceInfo.DESCRIPTOR):
            ri = rpc.ResourceInfo()
            detail.Unpack(ri)
            out.resource = (ri.resource_type, ri.resource_name)
        elif detail.Is(rpc.ErrorInfo.DESCRIPTOR):
            ei = rpc.ErrorInfo()
            detail.Unpack(ei)
            out.reason = ei.reason
        elif detail.Is(rpc.RetryInfo.DESCRIPTOR):
            ri_ = rpc.RetryInfo()
            detail.Unpack(ri_)
            out.retry_after_s = ri_.retry_delay.seconds + ri_.retry_delay.nanos / 1e9
    return out


def with_retries(call: Callable[[], R], *, attempts: int = 5, base_s: float = 0.1,
                 log: Callable[[str], None] = print) -> R:
    """Run `call` (which sends the same request, idempotency key included, every time) until it
    succeeds, fails for good, or runs out of attempts. Waits what RetryInfo says, else an
    exponential backoff with jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except grpc.RpcError as err:
            info = error_details(err)
            retry = info.code in RETRYABLE or (
                info.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.retry_after_s is not None)
            if not retry or attempt == attempts:
                raise
            wait = info.retry_after_s if info.retry_after_s is not None else (
                base_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            log(f"attempt {attempt}: {info.code.name}, retrying with the same key in {wait:.2f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def run(target: str, sku: str, location: str, quantity: int, api_key: str,
        out: Callable[[str], None] = print) -> int:
    metadata: tuple[tuple[str, str | bytes], ...] = (("x-api-key", api_key),) if api_key else ()
    with grpc.insecure_channel(target) as channel:
        stub = api_grpc.InventoryServiceStub(channel)

        got = stub.GetAvailability(api.GetAvailabilityRequest(
            skus=[sku], location_ids=[location], channel=pb.CHANNEL_WEB),
            metadata=metadata, timeout=5)
        level = got.items[0].levels[0] if got.items and got.items[0].levels else None
        out(f"available {sku}@{location}: {level.available if level else 0}")

        # 1. A refusal and what it carries: more than there is.
        try:
            stub.Reserve(api.ReserveRequest(lines=[pb.ReservationLine(
                sku=sku, location_id=location, quantity=10**9)]), metadata=metadata, timeout=5)
        except grpc.RpcError as err:
            out(f"refused as expected:\n{error_details(err)}")

        # 2. Reserve the cart. The key names this cart's reservation: any retry, after a lost
        # answer, a timeout or a crash of this process, sends the same key and gets the same
        # reservation, never a second one.
        key = f"cart-{uuid.uuid4()}"
        request = api.ReserveRequest(
            lines=[pb.ReservationLine(sku=sku, location_id=location, quantity=quantity)],
            ttl_seconds=600, channel=pb.CHANNEL_WEB, idempotency_key=key)

        def reserve() -> api.ReserveResponse:
            response: api.ReserveResponse = stub.Reserve(request, metadata=metadata, timeout=5)
            return response

        try:
            first = with_retries(reserve, log=out).reservation
        except grpc.RpcError as err:
            out(f"reservation failed:\n{error_details(err)}")
            return 1
        out(f"reserved {first.id} ({pb.ReservationStatus.Name(first.status)}) under key {key}")
        again = with_retries(reserve, log=out).reservation  # as if the first answer was lost
        out(f"the same key again: {again.id} (same reservation: {again.id == first.id})")

        # 3. The same key with another request is refused: ALREADY_EXISTS + ErrorInfo.
        try:
            stub.Reserve(api.ReserveRequest(lines=[pb.ReservationLine(
                sku=sku, location_id=location, quantity=quantity + 1)], idempotency_key=key),
                metadata=metadata, timeout=5)
        except grpc.RpcError as err:
            out(f"key reused for another cart:\n{error_details(err)}")

        # 4. Check out: commit (its own key: a retry must not be mistaken for another call).
        done = with_retries(lambda: stub.CommitReservation(api.CommitReservationRequest(
            reservation_id=first.id, idempotency_key=f"{key}/commit"),
            metadata=metadata, timeout=5), log=out)
        out(f"committed {done.reservation.id}: "
            + ", ".join(f"{m.sku}@{m.location_id} {m.delta:+d}" for m in done.movements))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--target", default="127.0.0.1:50051", help="service host:port")
    p.add_argument("--sku", default="SKU-000001")
    p.add_argument("--location", default="WH-WAW")
    p.add_argument("--quantity", type=int, default=1)
    p.add_argument("--api-key", default="", help="sent as x-api-key (a shop or admin principal)")
    args = p.parse_args(argv)
    return run(args.target, args.sku, args.location, args.quantity, args.api_key)


if __name__ == "__main__":
    sys.exit(main())
