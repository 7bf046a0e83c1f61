"""Protobuf ↔ domain conversion, at the transport edge only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory_svc.domain.errors import FieldViolation, InvalidArgument
from inventory_svc.domain.model import (
    Channel,
    Line,
    Location,
    LocationType,
    Movement,
    MovementKind,
    Reservation,
    ReservationStatus,
    SkuQuantity,
    StockLevel,
)

_LOCATION_TYPES: dict[int, LocationType] = {
    pb.LOCATION_TYPE_WAREHOUSE: LocationType.WAREHOUSE,
    pb.LOCATION_TYPE_STORE: LocationType.STORE,
}
_LOCATION_TYPES_BACK: dict[LocationType, int] = {v: k for k, v in _LOCATION_TYPES.items()}
# by name once, not a lookup by name in every answer
_CHANNELS_OUT: dict[Channel, pb.Channel.ValueType] = {
    c: pb.Channel.Value(f"CHANNEL_{c.value}") for c in Channel}
_CHANNELS_IN: dict[int, Channel] = {v: c for c, v in _CHANNELS_OUT.items()}
_STATUSES_OUT: dict[ReservationStatus, pb.ReservationStatus.ValueType] = {
    s: pb.ReservationStatus.Value(f"RESERVATION_STATUS_{s.value}") for s in ReservationStatus}
_KINDS_OUT: dict[MovementKind, pb.MovementKind.ValueType] = {
    k: pb.MovementKind.Value(f"MOVEMENT_KIND_{k.value}") for k in MovementKind}


def channel(value: int, field: str = "channel", default: Channel = Channel.WEB) -> Channel:
    if value == pb.CHANNEL_UNSPECIFIED:
        return default
    try:
        return _CHANNELS_IN[value]
    except KeyError:
        raise InvalidArgument([FieldViolation(field, f"unknown channel {value}")]) from None


def location_type(value: int, field: str) -> LocationType | None:
    if value == pb.LOCATION_TYPE_UNSPECIFIED:
        return None
    if value not in _LOCATION_TYPES:
        raise InvalidArgument([FieldViolation(field, f"unknown location type {value}")])
    return _LOCATION_TYPES[value]


def location_in(msg: pb.Location, index: int) -> Location:
    kind = location_type(msg.type, f"locations[{index}].type")
    if kind is None:
        raise InvalidArgument([FieldViolation(
            f"locations[{index}].type", "must be LOCATION_TYPE_WAREHOUSE or LOCATION_TYPE_STORE")])
    return Location(
        id=msg.id, name=msg.name, type=kind, lat=msg.lat, lon=msg.lon, can_ship=msg.can_ship,
        can_pickup=msg.can_pickup, active=msg.active, priority=msg.priority,
        fixed_cost=msg.fixed_cost, cost_per_km=msg.cost_per_km, cost_per_unit=msg.cost_per_unit,
        daily_capacity=msg.daily_capacity, default_safety_stock=msg.default_safety_stock,
    )


def location_out(loc: Location) -> pb.Location:
    return pb.Location(
        id=loc.id, name=loc.name,
        type=pb.LocationType.ValueType(_LOCATION_TYPES_BACK[loc.type]), lat=loc.lat, lon=loc.lon,
        can_ship=loc.can_ship, can_pickup=loc.can_pickup, active=loc.active,
        priority=loc.priority, fixed_cost=loc.fixed_cost, cost_per_km=loc.cost_per_km,
        cost_per_unit=loc.cost_per_unit, daily_capacity=loc.daily_capacity,
        default_safety_stock=loc.default_safety_stock,
    )


def level_fields(level: StockLevel, ch: Channel) -> dict[str, Any]:
    """The fields of a pb.StockLevel, for building it in place inside a repeated field (`add`
    does not copy a finished message, as `append` does)."""
    return dict(
        sku=level.sku, location_id=level.location_id, on_hand=level.on_hand,
        reserved=level.reserved, safety_stock=level.safety_stock, available=level.available(ch),
        version=level.version,
    )


def availability_out(sku: str, levels: Sequence[StockLevel], ch: Channel) -> api.SkuAvailability:
    """One SKU's levels and their totals (summed here: proto fields are slow to read back)."""
    msg = api.SkuAvailability(sku=sku)
    on_hand = reserved = available = 0
    for lv in levels:
        fields = level_fields(lv, ch)
        msg.levels.add(**fields)
        on_hand += lv.on_hand
        reserved += lv.reserved
        available += fields["available"]
    msg.total_on_hand, msg.total_reserved, msg.total_available = on_hand, reserved, available
    return msg


def level_out(level: StockLevel, ch: Channel) -> pb.StockLevel:
    return pb.StockLevel(**level_fields(level, ch))


def lines_in(msgs: list[pb.ReservationLine]) -> list[Line]:
    return [Line(m.sku, m.location_id, m.quantity) for m in msgs]


def items_in(msgs: list[api.SkuQuantity]) -> list[SkuQuantity]:
    return [SkuQuantity(m.sku, m.quantity) for m in msgs]


def reservation_out(res: Reservation) -> pb.Reservation:
    """The lines are what the reservation holds (or held when it ended): a line released down to
    0 is left out, so a client may send the lines it got back (every request refuses quantity 0)
    and a committed reservation lists exactly what was sold. Idempotent replays answer the bytes
    stored with the first answer, which this built, so they stay byte-identical."""
    return pb.Reservation(
        id=res.id,
        status=_STATUSES_OUT[res.status],
        channel=_CHANNELS_OUT[res.channel],
        order_ref=res.order_ref,
        lines=[pb.ReservationLine(sku=x.sku, location_id=x.location_id, quantity=x.quantity)
               for x in res.lines if x.quantity > 0],
        created_at_unix_ms=res.created_at_ms, expires_at_unix_ms=res.expires_at_ms,
        ended_at_unix_ms=res.ended_at_ms,
    )


def movement_out(m: Movement) -> pb.Movement:
    return pb.Movement(
        id=m.id, sku=m.sku, location_id=m.location_id, delta=m.delta,
        kind=_KINDS_OUT[m.kind], reason=m.reason,
        on_hand_after=m.on_hand_after, reservation_id=m.reservation_id, order_ref=m.order_ref,
        created_at_unix_ms=m.created_at_ms,
    )


def adjustment_kind(reason: int) -> tuple[MovementKind, str]:
    """RECEIPT is a goods receipt in the ledger; every other reason is an ADJUSTMENT."""
    if reason == api.ADJUSTMENT_REASON_RECEIPT:
        return MovementKind.RECEIPT, "receipt"
    if reason == api.ADJUSTMENT_REASON_UNSPECIFIED or reason not in api.AdjustmentReason.values():
        raise InvalidArgument([FieldViolation(
            "reason", f"{reason} must be one of RECEIPT, DAMAGE, SHRINKAGE, CORRECTION, FOUND, OTHER")])
    name = api.AdjustmentReason.Name(api.AdjustmentReason.ValueType(reason))
    return MovementKind.ADJUSTMENT, name.removeprefix("ADJUSTMENT_REASON_").lower()

