"""Reading gRPC errors the way a client does: code plus google.rpc details."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from inventory.v1 import common_pb2 as pb


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
        return err
    raise AssertionError(f"expected {code}, the call succeeded")


def details(err: grpc.aio.AioRpcError) -> list[Any]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no rich status attached"
    out: list[Any] = []
    for any_msg in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.PreconditionFailure,
                    error_details_pb2.ResourceInfo, error_details_pb2.QuotaFailure,
                    error_details_pb2.RetryInfo, pb.InsufficientStock):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out.append(msg)
    return out


def bad_fields(err: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for d in details(err) if isinstance(d, error_details_pb2.BadRequest)
            for v in d.field_violations]


def shortfalls(err: grpc.aio.AioRpcError) -> list[tuple[str, str, int, int]]:
    return [(x.sku, x.location_id, x.requested, x.available) for d in details(err)
            if isinstance(d, pb.InsufficientStock) for x in d.lines]
