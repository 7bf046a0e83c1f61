"""The layout of stock in Redis: its keys and the encoding of their values.

One hash per SKU, `inv:{sku}`, so every location of a SKU lives in one cluster slot; each field
is a location id with the value "on_hand:reserved:safety:version:seq:held": Postgres' committed
values with the seq they came with (newer seqs win, so commits land in Postgres' order), and the
units of holds in flight, which count against availability but are not reported as reserved.
Field "_" marks a hash that was loaded whole from Postgres: without it the SKU must be hydrated
before it is trusted. Beside it, `hold:{sku}` (same slot) records the holds in flight: hold id →
"ms;loc=qty;...", taken in the hold's own script and ended with its units (settle.lua) once
Postgres has committed them, or they are given back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from inventory_svc.domain.model import StockLevel


def stock_key(sku: str) -> str:
    return "inv:{" + sku + "}"


def hold_key(sku: str) -> str:
    """The in-flight hold records of a SKU (same hash slot as its stock hash)."""
    return "hold:{" + sku + "}"


@dataclass(frozen=True, slots=True)
class HoldRecord:
    """A hold as recorded in Redis: when (Redis clock, ms) and the units per location."""

    id: str
    created_ms: int
    units: dict[str, int]


def decode_hold(hold_id: str, value: bytes | str) -> HoldRecord:
    text = value if isinstance(value, str) else value.decode()
    ms, *parts = text.split(";")
    units: dict[str, int] = {}
    for part in parts:
        loc, _, qty = part.partition("=")
        units[loc] = units.get(loc, 0) + int(qty)
    return HoldRecord(hold_id, int(ms), units)


def encode_committed(level: StockLevel) -> str:
    """The Postgres part of a field's value, as hydrate.lua loads it."""
    return f"{level.on_hand}:{level.reserved}:{level.safety_stock}:{level.version}:{level.seq}"


def encode_level(level: StockLevel, held: int = 0) -> str:
    return f"{encode_committed(level)}:{held}"


@dataclass(frozen=True, slots=True)
class Cached:
    """One SKU-location as Redis has it: the committed level, and the units held in flight."""

    level: StockLevel
    held: int

    def encode(self) -> str:
        return encode_level(self.level, self.held)


def _parse(fields: dict[bytes, bytes]) -> Iterator[tuple[str, list[bytes]]]:
    """Each location's field split into on_hand, reserved, safety, version, seq, held (the
    numbers left as bytes: each reader converts only what it uses)."""
    for loc, value in fields.items():
        if loc != b"_":
            yield loc.decode(), value.split(b":")


def _decode(sku: str, fields: dict[bytes, bytes]) -> Iterator[tuple[StockLevel, int]]:
    """Each field's committed level and its units held in flight."""
    for loc, (h, r, s, v, q, held) in _parse(fields):
        yield StockLevel(sku, loc, int(h), int(r), int(s), int(v), int(q)), int(held)


def gate_units(fields: dict[bytes, bytes]) -> Iterator[tuple[str, int, int, int]]:
    """Per location (on_hand, reserved with the units held in flight, safety stock): what a new
    hold would find, without building a StockLevel per field (routing reads many)."""
    for loc, (h, r, s, _v, _q, held) in _parse(fields):
        yield loc, int(h), int(r) + int(held), int(s)


def decode_cached(sku: str, fields: dict[bytes, bytes]) -> list[Cached]:
    return [Cached(level, held) for level, held in _decode(sku, fields)]


def decode_levels(sku: str, fields: dict[bytes, bytes]) -> list[StockLevel]:
    """The committed levels (holds in flight left out)."""
    return [level for level, _ in _decode(sku, fields)]
