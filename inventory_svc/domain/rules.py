"""Pure rules over locked stock rows: can these lines be taken, and what changes if so."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from inventory_svc.domain.errors import (
    CapacityTaken,
    FailedPrecondition,
    InsufficientStock,
    NotFound,
    Shortfall,
)
from inventory_svc.domain.model import Channel, Line, StockLevel, available_units


@dataclass(frozen=True, slots=True)
class LockedStock:
    """A stock row as read under its row lock, with what the location says about it."""

    level: StockLevel
    location_active: bool


StockKey = tuple[str, str]


def check_can_take(
    lines: Sequence[Line], rows: Mapping[StockKey, LockedStock], channel: Channel
) -> None:
    """Raise unless every line can be held at once (all-or-nothing)."""
    for line in lines:
        row = rows.get((line.sku, line.location_id))
        if row is None:
            raise NotFound("stock", f"{line.sku}@{line.location_id}")
        if not row.location_active:
            raise FailedPrecondition(
                f"location {line.location_id!r} is not active",
                violation_type="LOCATION_INACTIVE",
                subject=line.location_id,
            )
    shortfalls = tuple(
        Shortfall(line.sku, line.location_id, line.quantity, avail)
        for line in lines
        if (avail := rows[(line.sku, line.location_id)].level.available(channel)) < line.quantity
    )
    if shortfalls:
        raise InsufficientStock(shortfalls)


def check_capacity(
    location_ids: Sequence[str], used: Mapping[str, int], capacity: Mapping[str, int]
) -> None:
    """Raise unless each location has a shipment left today (capacity 0: unlimited)."""
    for loc in location_ids:
        cap = capacity.get(loc, 0)
        if 0 < cap <= used.get(loc, 0):
            raise CapacityTaken(f"location {loc!r} has used its {cap} shipments for today",
                                violation_type="NO_CAPACITY", subject=loc)


def check_can_remove(level: StockLevel, units: int) -> None:
    """Units leaving the shelf (adjustment down, transfer out) may not touch reserved ones."""
    free = available_units(level.on_hand, level.reserved, 0, Channel.POS)
    if units > free:
        raise InsufficientStock((Shortfall(level.sku, level.location_id, units, free),))


def check_release(held: Mapping[StockKey, int], release: Sequence[Line]) -> None:
    """A partial release may only give back units the reservation still holds."""
    for line in release:
        have = held.get((line.sku, line.location_id))
        if have is None:
            raise NotFound("reservation line", f"{line.sku}@{line.location_id}")
        if line.quantity > have:
            raise FailedPrecondition(
                f"cannot release {line.quantity} of {line.sku}@{line.location_id}: "
                f"the reservation holds {have}",
                violation_type="RELEASE_EXCEEDS_HELD",
                subject=f"{line.sku}@{line.location_id}",
            )
