"""WatchStock (docs/WATCH.md): stock events, what a stream asks for, and the channel alerts an
event raises. Pure rules, no I/O: the stream reader (app/watch.py) asks them for every event."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from inventory_svc.domain import validation as val
from inventory_svc.domain.model import Channel, StockLevel, available_units
from inventory_svc.domain.principal import Principal


class EventKind(enum.StrEnum):
    """What caused a change of a SKU-location (derived by the sequencer from what the changing
    transaction wrote: its ledger rows and its reservation events)."""

    RESERVE = "RESERVE"
    COMMIT = "COMMIT"  # a reservation committed: its units leave the shelf
    RELEASE = "RELEASE"
    EXPIRY = "EXPIRY"
    SALE = "SALE"  # a POS sale
    RETURN = "RETURN"
    ADJUSTMENT = "ADJUSTMENT"
    RECEIPT = "RECEIPT"
    COUNT = "COUNT"
    TRANSFER = "TRANSFER"
    IMPORT = "IMPORT"
    SAFETY_STOCK = "SAFETY_STOCK"  # the row's or its location's safety stock


class AlertKind(enum.StrEnum):
    SOLD_OUT = "SOLD_OUT"  # available went from > 0 to 0
    BACK_IN_STOCK = "BACK_IN_STOCK"  # from 0 to > 0
    LOW_STOCK = "LOW_STOCK"  # from >= the threshold to below it (and above 0)


class AlertScope(enum.StrEnum):
    SKU = "SKU"  # the SKU's available-to-promise over every active location
    LOCATION = "LOCATION"  # the SKU at the event's location


@dataclass(frozen=True, slots=True)
class StockEvent:
    """One committed change of one SKU-location, as numbered by the sequencer."""

    seq: int  # commit order; contiguous over the whole stream
    kind: EventKind
    sku: str
    location_id: str
    on_hand: int
    reserved: int
    safety_stock: int  # effective
    on_hand_delta: int
    reserved_delta: int
    version: int
    change_seq: int  # the row's stock.seq after the change: for one row, newer is larger
    location_active: bool
    # the SKU's available-to-promise over every active location, (before, after) this change
    sku_remote: tuple[int, int]  # for remote channels
    sku_pos: tuple[int, int]  # for POS
    reservation_ids: tuple[str, ...]
    order_refs: tuple[str, ...]
    committed_at_us: int
    sequenced_at_us: int

    def available(self, channel: Channel) -> int:
        return available_units(self.on_hand, self.reserved, self.safety_stock, channel)

    def available_before(self, channel: Channel) -> int:
        """At this SKU-location before the change (the safety stock as it is now)."""
        return available_units(self.on_hand - self.on_hand_delta,
                               self.reserved - self.reserved_delta, self.safety_stock, channel)

    def sku_available(self, channel: Channel) -> tuple[int, int]:
        """The SKU's available-to-promise for `channel`, before and after."""
        return self.sku_pos if channel is Channel.POS else self.sku_remote


@dataclass(frozen=True, slots=True)
class Alert:
    kind: AlertKind
    scope: AlertScope
    channel: Channel
    available_before: int
    available_after: int
    threshold: int = 0  # LOW_STOCK: the threshold crossed


def crossings(before: int, after: int, low_stock: int) -> list[AlertKind]:
    """The thresholds a change of available from `before` to `after` crosses: sold out, back in
    stock, and (with low_stock > 0) below low_stock while still in stock. One change crosses
    each at most once, so an alert fires once per crossing."""
    out: list[AlertKind] = []
    if before > 0 and after == 0:
        out.append(AlertKind.SOLD_OUT)
    elif before == 0 and after > 0:
        out.append(AlertKind.BACK_IN_STOCK)
    if low_stock > 0 and before >= low_stock > after > 0:
        out.append(AlertKind.LOW_STOCK)
    return out


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    level: StockLevel  # level.seq is the row's change_seq
    location_active: bool


@dataclass(frozen=True, slots=True)
class SnapshotPage:
    """Part of the state a stream starts from; `sequence` is where its events start (the last
    event sequence taken before the snapshot was read)."""

    rows: tuple[SnapshotRow, ...]
    sequence: int
    done: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing to send: every event up to `sequence` has been looked at for this stream (a
    consumer may resume after it); `head` is the last sequence taken so far."""

    sequence: int
    head: int
    server_time_us: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event as one stream sees it: with the alerts it raises for that stream's channel."""

    event: StockEvent
    alerts: tuple[Alert, ...]
    sku_totals: bool  # the stream may see the SKU's availability over every location


@dataclass(frozen=True, slots=True)
class DeliveryBatch:
    """Consecutive deliveries of one stream that go in one message (the consumer asked for
    several events a message)."""

    deliveries: tuple[Delivery, ...]


def sees_all_locations(p: Principal) -> bool:
    """A principal with a location scope sees the stream of its locations only, unless its role
    manages every location's stock (erp, admin)."""
    return not p.scoped or p.manages_all


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """What one stream asks for, narrowed to what its principal may see."""

    skus: frozenset[str] = frozenset()  # empty: every SKU
    locations: frozenset[str] = frozenset()  # empty (and no prefix): every location
    location_prefix: str = ""
    kinds: frozenset[EventKind] = frozenset()  # empty: every kind
    channel: Channel = Channel.WEB
    low_stock: int = 0  # LOW_STOCK alerts below this many units; 0: none
    location_alerts: bool = False  # alerts of the SKU at each location too
    alerts_only: bool = False  # only events that raise an alert
    scope: Principal | None = None  # a principal limited to its locations; None: sees all

    @property
    def sku_totals(self) -> bool:
        """SKU-wide availability (and its alerts) sums every location's stock: not for a
        principal that may see only its own."""
        return self.scope is None

    def location_ok(self, location_id: str) -> bool:
        if self.scope is not None and not self.scope.may_act_at(location_id):
            return False
        if self.locations or self.location_prefix:
            return location_id in self.locations or (
                bool(self.location_prefix) and location_id.startswith(self.location_prefix))
        return True

    def deliver(self, ev: StockEvent) -> Delivery | None:
        """The event as this stream gets it, or None when the stream does not want it."""
        if (self.skus and ev.sku not in self.skus) or not self.location_ok(ev.location_id):
            return None
        if self.kinds and ev.kind not in self.kinds:
            return None
        alerts = self.alerts(ev)
        if self.alerts_only and not alerts:
            return None
        return Delivery(ev, alerts, self.sku_totals)

    def alerts(self, ev: StockEvent) -> tuple[Alert, ...]:
        out: list[Alert] = []
        if self.sku_totals:
            before, after = ev.sku_available(self.channel)
            out += [Alert(k, AlertScope.SKU, self.channel, before, after,
                          self.low_stock if k is AlertKind.LOW_STOCK else 0)
                    for k in crossings(before, after, self.low_stock)]
        if self.location_alerts:
            before, after = ev.available_before(self.channel), ev.available(self.channel)
            out += [Alert(k, AlertScope.LOCATION, self.channel, before, after,
                          self.low_stock if k is AlertKind.LOW_STOCK else 0)
                    for k in crossings(before, after, self.low_stock)]
        return tuple(out)


def build_filter(
    principal: Principal, channel: Channel, *, skus: Sequence[str], location_ids: Sequence[str],
    location_prefix: str, kinds: Sequence[EventKind], low_stock: int, location_alerts: bool,
    alerts_only: bool, after_sequence: int | None, max_skus: int, max_ids: int,
) -> WatchFilter:
    """A checked filter: INVALID_ARGUMENT naming each bad field, PERMISSION_DENIED for a named
    location outside the principal's scope (a prefix is narrowed to the scope instead)."""
    v = val.Violations()
    val.check_count("skus", len(skus), max_skus)
    val.check_count("location_ids", len(location_ids), max_ids)
    for i, sku in enumerate(skus):
        v.sku(f"skus[{i}]", sku)
    for i, loc in enumerate(location_ids):
        v.location_id(f"location_ids[{i}]", loc)
    if location_prefix:
        v.location_id("location_prefix", location_prefix)
    if not 0 <= low_stock <= val.MAX_QUANTITY:
        v.add("low_stock_threshold", f"{low_stock} must be between 0 (none) and "
                                     f"{val.MAX_QUANTITY}")
    if after_sequence is not None and after_sequence < 0:
        v.add("after_sequence", f"{after_sequence} must be >= 0")
    v.raise_if_any()
    principal.require_locations(location_ids)
    return WatchFilter(
        skus=frozenset(skus), locations=frozenset(location_ids), location_prefix=location_prefix,
        kinds=frozenset(kinds), channel=channel, low_stock=low_stock,
        location_alerts=location_alerts, alerts_only=alerts_only,
        scope=None if sees_all_locations(principal) else principal)
