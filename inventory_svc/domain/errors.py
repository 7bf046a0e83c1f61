"""Domain errors, one class per DESIGN.md §4 status; the transport maps them to gRPC codes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True, slots=True)
class Shortfall:
    """One line that cannot be served: what was asked and what there is."""

    sku: str
    location_id: str
    requested: int
    available: int


def quote(value: object, limit: int = 64) -> str:
    """A client's value as error text quotes it: repr, at most `limit` characters of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class DomainError(Exception):
    """Base of every error a client can cause or must see; never maps to INTERNAL."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    def __init__(self, violations: list[FieldViolation] | tuple[FieldViolation, ...]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class NotFound(DomainError):
    def __init__(self, resource_type: str, resource_name: str, message: str | None = None) -> None:
        self.resource_type = resource_type
        self.resource_name = resource_name
        super().__init__(message or f"{resource_type} {quote(resource_name)} not found")


class FailedPrecondition(DomainError):
    def __init__(
        self,
        message: str,
        *,
        violation_type: str = "STATE",
        subject: str = "",
        shortfalls: tuple[Shortfall, ...] = (),
    ) -> None:
        self.violation_type = violation_type
        self.subject = subject
        self.shortfalls = shortfalls
        super().__init__(message)


class InsufficientStock(FailedPrecondition):
    """Short of stock. `key_unused`: the hold also showed that no call with this call's
    idempotency key ever took stock, so there is no earlier answer to replay."""

    def __init__(self, shortfalls: tuple[Shortfall, ...], *, key_unused: bool = False) -> None:
        self.key_unused = key_unused
        detail = ", ".join(
            f"{s.sku}@{s.location_id}: requested {s.requested}, available {s.available}"
            for s in shortfalls
        )
        super().__init__(
            f"insufficient stock: {detail}",
            violation_type="INSUFFICIENT_STOCK",
            subject=shortfalls[0].sku if shortfalls else "",
            shortfalls=shortfalls,
        )


class CapacityTaken(FailedPrecondition):
    """A concurrent order used a location's last shipment of the day first: route again."""


class ReturnExceedsSale(FailedPrecondition):
    """A return of more units of a SKU than its sale sold less what came back already.

    `lines` are (sku, requested, returnable) of every offending line; the status names the
    first as the PreconditionFailure subject and all of them in its message."""

    def __init__(self, sale: str, lines: tuple[tuple[str, int, int], ...]) -> None:
        self.lines = lines
        detail = "; ".join(f"{sku}: requested {req}, returnable {left}"
                           for sku, req, left in lines)
        super().__init__(f"cannot return more than {sale} sold: {detail}",
                         violation_type="RETURN_EXCEEDS_SALE",
                         subject=lines[0][0] if lines else "")


class AlreadyExists(DomainError):
    """`reason` is the google.rpc.ErrorInfo reason a client branches on; `metadata` its
    key-value facts (strings)."""

    def __init__(self, message: str, *, reason: str = "IDEMPOTENCY_KEY_REUSED",
                 metadata: dict[str, str] | None = None) -> None:
        self.reason = reason
        self.metadata = dict(metadata or {})
        super().__init__(message)


class Aborted(DomainError):
    pass


class Unavailable(DomainError):
    """Nothing was done; `retry_after_s` is when trying again may succeed (RetryInfo)."""

    def __init__(self, message: str, *, retry_after_s: float = 0.2) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class DeadlineExceeded(DomainError):
    """The caller's deadline ran out while the outcome was unknown: retry with the same key."""


class ResourceExhausted(DomainError):
    def __init__(self, message: str, *, subject: str = "", retry_after_s: float = 0.0) -> None:
        self.subject = subject
        self.retry_after_s = retry_after_s  # > 0: when trying again may succeed (rate limits)
        super().__init__(message)


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass
