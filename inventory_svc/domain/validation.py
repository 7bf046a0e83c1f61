"""Input validation as pure functions. Every refusal names the field and the value (DESIGN §4)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from inventory_svc.domain.errors import FieldViolation, InvalidArgument, ResourceExhausted, quote
from inventory_svc.domain.model import Line, Location, SkuQuantity

LOCATION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
# SKUs are free-form but may not hold whitespace, control characters, or the characters we use
# as separators in Redis keys and fields ({ } for the cluster hash tag, | between field parts).
SKU_RE = re.compile(r"[^\s{}|\x00-\x1f\x7f]{1,64}")
MAX_QUANTITY = 1_000_000_000
MAX_KEY_LEN = 128
MAX_TEXT_LEN = 256
# FindNearby without a radius (proto3 reads an unset double as 0) searches this far: about a
# metropolitan area, where "in a store near me" still means something. 20,000 km is half the
# Earth's circumference: beyond it every point is in range anyway.
DEFAULT_RADIUS_KM = 50.0
MAX_RADIUS_KM = 20_000.0


def _show(value: object) -> str:
    return quote(value)


class Violations:
    """Collects field violations; `raise_if_any` turns them into INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

    def sku(self, field: str, value: str) -> None:
        if not SKU_RE.fullmatch(value):
            self.add(field, f"sku {_show(value)} must be 1-64 characters without spaces or {{}}|")

    def location_id(self, field: str, value: str) -> None:
        if not LOCATION_ID_RE.fullmatch(value):
            self.add(field, f"location id {_show(value)} must be 1-64 characters of A-Za-z0-9_.-")

    def quantity(self, field: str, value: int, *, allow_zero: bool = False) -> None:
        low = 0 if allow_zero else 1
        if not low <= value <= MAX_QUANTITY:
            self.add(field, f"{value} must be between {low} and {MAX_QUANTITY}")

    def text(self, field: str, value: str, limit: int = MAX_TEXT_LEN) -> None:
        if len(value) > limit:
            self.add(field, f"{len(value)} characters is longer than the limit of {limit}")
        elif "\x00" in value:  # Postgres text cannot hold NUL
            self.add(field, f"{_show(value)} must not contain NUL characters")

    def coordinates(self, prefix: str, lat: float, lon: float) -> None:
        if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
            self.add(f"{prefix}lat", f"latitude {lat} must be a finite number in [-90, 90]")
        if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
            self.add(f"{prefix}lon", f"longitude {lon} must be a finite number in [-180, 180]")

    def non_negative(self, field: str, value: float) -> None:
        if not (math.isfinite(value) and 0.0 <= value <= 1e9):
            self.add(field, f"{value} must be a finite number between 0 and 1e9")


def nearby_radius(v: Violations, radius_km: float) -> float:
    """FindNearby's radius: 0 (unset) is DEFAULT_RADIUS_KM; otherwise (0, MAX_RADIUS_KM]."""
    if radius_km == 0:
        return DEFAULT_RADIUS_KM
    if not (math.isfinite(radius_km) and 0 < radius_km <= MAX_RADIUS_KM):
        v.add("radius_km", f"{radius_km} must be 0 (the default, {DEFAULT_RADIUS_KM:g} km) or a"
              f" distance in (0, {MAX_RADIUS_KM:g}] km")
    return radius_km


def check_idempotency_key(v: Violations, key: str) -> None:
    v.text("idempotency_key", key, MAX_KEY_LEN)


def check_count(subject: str, count: int, limit: int) -> None:
    """Size limits are RESOURCE_EXHAUSTED, not INVALID_ARGUMENT: the request is well formed."""
    if count > limit:
        raise ResourceExhausted(f"{subject}: {count} exceeds the limit of {limit}", subject=subject)


def validate_lines(v: Violations, field: str, lines: Sequence[Line], max_lines: int) -> None:
    if not lines:
        v.add(field, "at least one line is required")
    check_count(field, len(lines), max_lines)
    seen: set[tuple[str, str]] = set()
    for i, line in enumerate(lines):
        v.sku(f"{field}[{i}].sku", line.sku)
        v.location_id(f"{field}[{i}].location_id", line.location_id)
        v.quantity(f"{field}[{i}].quantity", line.quantity)
        key = (line.sku, line.location_id)
        if key in seen:
            v.add(f"{field}[{i}]", f"duplicate line for sku {line.sku!r} at {line.location_id!r}")
        seen.add(key)


def validate_items(v: Violations, field: str, items: Sequence[SkuQuantity], max_lines: int) -> None:
    if not items:
        v.add(field, "at least one item is required")
    check_count(field, len(items), max_lines)
    seen: set[str] = set()
    for i, item in enumerate(items):
        v.sku(f"{field}[{i}].sku", item.sku)
        v.quantity(f"{field}[{i}].quantity", item.quantity)
        if item.sku in seen:
            v.add(f"{field}[{i}]", f"duplicate item for sku {item.sku!r}")
        seen.add(item.sku)


def validate_ttl(v: Violations, field: str, ttl_s: int, min_s: int, max_s: int) -> None:
    if ttl_s != 0 and not min_s <= ttl_s <= max_s:
        v.add(field, f"{ttl_s} must be 0 (the default) or between {min_s} and {max_s} seconds")


def validate_locations(v: Violations, locations: Iterable[Location]) -> None:
    seen: set[str] = set()
    for i, loc in enumerate(locations):
        f = f"locations[{i}]."
        v.location_id(f + "id", loc.id)
        if loc.id in seen:
            v.add(f + "id", f"duplicate location id {loc.id!r}")
        seen.add(loc.id)
        v.text(f + "name", loc.name)
        v.coordinates(f, loc.lat, loc.lon)
        for name in ("fixed_cost", "cost_per_km", "cost_per_unit"):
            v.non_negative(f + name, getattr(loc, name))
        if not 0 <= loc.daily_capacity <= MAX_QUANTITY:
            v.add(f + "daily_capacity", f"{loc.daily_capacity} must be >= 0 (0 = unlimited)")
        if not 0 <= loc.default_safety_stock <= MAX_QUANTITY:
            v.add(f + "default_safety_stock", f"{loc.default_safety_stock} must be >= 0")
