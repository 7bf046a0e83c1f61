"""Domain errors → gRPC status with google.rpc details (DESIGN §4)."""

from __future__ import annotations

import functools

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from inventory.v1 import common_pb2 as pb
from inventory_svc.domain import errors as e

# google.rpc.ErrorInfo.domain of the reasons this service defines (ErrorInfo.reason)
ERROR_DOMAIN = "inventory.v1"


def _pack(*details: object) -> list[any_pb2.Any]:
    out = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)  # type: ignore[arg-type]
        out.append(a)
    return out


# gRPC carries the status message and details in HTTP/2 trailers, which clients refuse beyond 8 KB
# (the answer is then lost as RESOURCE_EXHAUSTED "Stream removed"): a refusal of a request with
# hundreds of bad fields names the first MAX_ITEMS of them and how many more there are. Limits
# count bytes as they travel, not characters: grpc-message percent-encodes every byte outside
# printable ASCII (a 4-byte emoji costs 12), and grpc-status-details-bin carries the whole Status
# (the message again, and the details) in base64. With these the trailers stay under ~5 KB.
MAX_ITEMS = 20
MAX_MESSAGE = 800  # wire bytes of grpc-message
MAX_DESCRIPTION = 300  # wire bytes of one description
MAX_VALUE = 64  # characters of a client's value quoted in a detail field
MAX_DETAILS = 2_400  # bytes of the packed details, before base64; fewer items until they fit


def _first(items: tuple[e.FieldViolation, ...], n: int = MAX_ITEMS) -> list[e.FieldViolation]:
    if len(items) <= n:
        return list(items)
    return [*items[:n], e.FieldViolation(
        _cut(items[n].field), f"... and {len(items) - n} more violations")]


def _wire_len(text: str) -> int:
    """Bytes of `text` percent-encoded as grpc-message (an upper bound of its UTF-8 size too)."""
    if text.isascii() and text.isprintable():  # the usual message: no byte-by-byte walk
        return len(text) + 2 * text.count("%")
    return sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in text.encode())


def _short(text: str, limit: int = MAX_MESSAGE) -> str:
    if _wire_len(text) <= limit:
        return text
    out, used = [], 3  # the "..."
    for ch in text:
        used += _wire_len(ch)
        if used > limit:
            break
        out.append(ch)
    return "".join(out) + "..."


def _cut(text: str) -> str:
    """A value quoted in a detail field: at most a short prefix (a 10 KB id must not make a
    trailer that clients refuse)."""
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE] + "…"


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    whole = int(seconds)
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
        seconds=whole, nanos=int((seconds - whole) * 1e9)))


def to_status(err: e.DomainError) -> grpc.Status:
    if type(err) is e.InsufficientStock and len(err.shortfalls) == 1:
        return _short_of_stock(err.shortfalls[0])
    return _status(err)


@functools.lru_cache(maxsize=1_024)
def _short_of_stock(shortfall: e.Shortfall) -> grpc.Status:
    """The status of a one-line refusal for stock, made once for what it says: the losers of a
    flash sale all hear "requested 1, available 0" of the same few rows, and building the status
    with its two packed details was an eighth of a loser's Python time. Its text is made from
    the shortfall alone, and a status is immutable, so one serves every call. One line only: a
    key of a hundred made-up rows a call would let a client fill the cache with large entries."""
    return _status(e.InsufficientStock((shortfall,)))


def _status(err: e.DomainError) -> grpc.Status:
    n = MAX_ITEMS
    code, details = _parts(err, n)
    while n > 0 and sum(d.ByteSize() for d in details) > MAX_DETAILS:
        n //= 2
        code, details = _parts(err, n)
    return rpc_status.to_status(status_pb2.Status(code=code, message=_short(err.message),
                                                  details=details))


def _parts(err: e.DomainError, n: int) -> tuple[int, list[any_pb2.Any]]:
    """The code and the details naming at most `n` items (violations, short lines)."""
    code: int
    details: list[any_pb2.Any] = []
    match err:
        case e.InvalidArgument():
            code = code_pb2.INVALID_ARGUMENT
            details = _pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_cut(v.field), description=_short(v.description, MAX_DESCRIPTION))
                for v in _first(err.violations, n)]))
        case e.NotFound():
            code = code_pb2.NOT_FOUND
            details = _pack(error_details_pb2.ResourceInfo(
                resource_type=err.resource_type, resource_name=_cut(err.resource_name),
                description=_short(err.message, MAX_DESCRIPTION)))
        case e.FailedPrecondition():
            code = code_pb2.FAILED_PRECONDITION
            violations = [error_details_pb2.PreconditionFailure.Violation(
                type=err.violation_type, subject=_cut(f"{s.sku}@{s.location_id}"),
                description=f"requested {s.requested}, available {s.available}")
                for s in err.shortfalls[:max(n, 1)]] or [error_details_pb2.PreconditionFailure.Violation(
                    type=err.violation_type, subject=_cut(err.subject),
                    description=_short(err.message, MAX_DESCRIPTION))]
            details = _pack(error_details_pb2.PreconditionFailure(violations=violations))
            if err.shortfalls:
                details += _pack(pb.InsufficientStock(lines=[
                    pb.InsufficientStock.Line(sku=_cut(s.sku), location_id=_cut(s.location_id),
                                              requested=s.requested, available=s.available)
                    for s in err.shortfalls[:max(n, 1)]]))
        case e.AlreadyExists():
            code = code_pb2.ALREADY_EXISTS
            # a machine-readable reason beside the text: today only an idempotency key used
            # before for another request (DESIGN §3 I6), which the client must not retry as is
            details = _pack(error_details_pb2.ErrorInfo(
                reason=err.reason, domain=ERROR_DOMAIN,
                metadata={k: _cut(v) for k, v in list(err.metadata.items())[:MAX_ITEMS]}))
        case e.Aborted():
            code = code_pb2.ABORTED
            details = _pack(_retry_info(0.05))
        case e.Unavailable():
            code = code_pb2.UNAVAILABLE
            details = _pack(_retry_info(err.retry_after_s))
        case e.ResourceExhausted():
            code = code_pb2.RESOURCE_EXHAUSTED
            details = _pack(error_details_pb2.QuotaFailure(violations=[
                error_details_pb2.QuotaFailure.Violation(subject=_cut(err.subject),
                                                         description=_short(err.message))]))
            if err.retry_after_s > 0:
                details += _pack(_retry_info(err.retry_after_s))
        case e.DeadlineExceeded():
            code = code_pb2.DEADLINE_EXCEEDED
        case e.Unauthenticated():
            code = code_pb2.UNAUTHENTICATED
        case e.PermissionDenied():
            code = code_pb2.PERMISSION_DENIED
        case _:
            code = code_pb2.INTERNAL
    return code, details
