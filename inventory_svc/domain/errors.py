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
        super().__init__(message or f"{resource_type} {resource_name!r} not found")


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
    def __init__(self, shortfalls: tuple[Shortfall, ...]) -> None:
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


class AlreadyExists(DomainError):
    pass


class Aborted(DomainError):
    pass


class Unavailable(DomainError):
    pass


class ResourceExhausted(DomainError):
    def __init__(self, message: str, *, subject: str = "") -> None:
        self.subject = subject
        super().__init__(message)


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass
