"""Domain types: locations, stock levels, reservations, ledger movements (DESIGN.md §3)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Channel(enum.StrEnum):
    WEB = "WEB"
    APP = "APP"
    POS = "POS"
    CALL_CENTER = "CALL_CENTER"
    MARKETPLACE = "MARKETPLACE"


class LocationType(enum.StrEnum):
    WAREHOUSE = "WAREHOUSE"
    STORE = "STORE"


class ReservationStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


class MovementKind(enum.StrEnum):
    RECEIPT = "RECEIPT"
    SALE = "SALE"
    ADJUSTMENT = "ADJUSTMENT"
    COUNT = "COUNT"
    RETURN = "RETURN"
    TRANSFER_OUT = "TRANSFER_OUT"
    TRANSFER_IN = "TRANSFER_IN"
    IMPORT = "IMPORT"


@dataclass(frozen=True, slots=True)
class Location:
    id: str
    name: str
    type: LocationType
    lat: float
    lon: float
    can_ship: bool
    can_pickup: bool
    active: bool
    priority: int
    fixed_cost: float
    cost_per_km: float
    cost_per_unit: float
    daily_capacity: int
    default_safety_stock: int


def available_units(on_hand: int, reserved: int, safety_stock: int, channel: Channel) -> int:
    """Units a channel may still take: POS may sell its own safety buffer, remote channels not."""
    buffer = 0 if channel is Channel.POS else safety_stock
    return max(0, on_hand - reserved - buffer)


@dataclass(frozen=True, slots=True)
class StockLevel:
    sku: str
    location_id: str
    on_hand: int
    reserved: int
    safety_stock: int
    version: int
    # Postgres' change number of the row (stock_seq): newer values win in Redis. 0: not known.
    seq: int = 0

    def available(self, channel: Channel) -> int:
        return available_units(self.on_hand, self.reserved, self.safety_stock, channel)


@dataclass(frozen=True, slots=True)
class Line:
    """A quantity of one SKU at one location (a reservation line, a release request line)."""

    sku: str
    location_id: str
    quantity: int


@dataclass(frozen=True, slots=True)
class SkuQuantity:
    sku: str
    quantity: int


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    status: ReservationStatus
    channel: Channel
    order_ref: str
    lines: tuple[Line, ...]
    created_at_ms: int
    expires_at_ms: int
    ended_at_ms: int


@dataclass(frozen=True, slots=True)
class Movement:
    id: int
    sku: str
    location_id: str
    delta: int
    kind: MovementKind
    reason: str
    on_hand_after: int
    reservation_id: str
    order_ref: str
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class ImportRow:
    row_number: int
    sku: str
    location_id: str
    on_hand: int
    safety_stock: int | None
