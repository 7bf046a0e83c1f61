"""Use cases on locations and stock: writes that go through Postgres first, reads from Redis."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import operator
from collections.abc import Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace

import asyncpg

from inventory_svc.app.context import Context
from inventory_svc.app.returns import ReturnService
from inventory_svc.domain import validation as val
from inventory_svc.domain.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    NotFound,
    quote,
)
from inventory_svc.domain.model import (
    Channel,
    ImportRow,
    Location,
    LocationType,
    Movement,
    MovementKind,
    SkuQuantity,
    StockLevel,
)
from inventory_svc.domain.rules import LockedStock, check_can_remove
from inventory_svc.storage.pg import MovementDraft, PgStore
from inventory_svc.storage.pg_base import Idem, Replay
from inventory_svc.storage.redis_layout import decode_levels
from routing.geo import haversine_km


@dataclass(frozen=True, slots=True)
class StockChange:
    level: StockLevel
    movements: tuple[Movement, ...]


@dataclass(frozen=True, slots=True)
class TransferResult:
    source: StockLevel
    destination: StockLevel
    movements: tuple[Movement, ...]


@dataclass(frozen=True, slots=True)
class ImportResult:
    rows_received: int
    rows_changed: int
    skus: int


class SkuAvailability:
    """One SKU's levels at the locations asked for, by location, decoded from its Redis fields
    when first read. `source` is those fields byte for byte and `scope` the locations asked for
    (or the version of "every active one"): an answer built from the same source in the same
    scope is the same answer, and a caller that kept it need not decode anything."""

    __slots__ = ("_fields", "_levels", "_wanted", "scope", "sku", "source")

    def __init__(self, sku: str, fields: dict[bytes, bytes], scope: Hashable,
                 wanted: Collection[str]) -> None:
        self.sku = sku
        self.scope = scope
        self.source = tuple(fields.items())
        self._fields = fields
        self._wanted = wanted
        self._levels: tuple[StockLevel, ...] | None = None

    @property
    def levels(self) -> tuple[StockLevel, ...]:
        if self._levels is None:
            self._levels = tuple(sorted(
                (lv for lv in decode_levels(self.sku, self._fields)
                 if lv.location_id in self._wanted),
                key=lambda lv: lv.location_id))
        return self._levels


@dataclass(frozen=True, slots=True)
class Nearby:
    location: Location
    distance_km: float
    levels: tuple[StockLevel, ...]


# A bulk load of a few hundred thousand rows legitimately runs for many seconds.
BULK_TIMEOUT_S = 300.0
# rows of an import checked, locked and written at a time, the event loop free in between
IMPORT_SLICE = 1_000
_ROW_KEY = operator.attrgetter("sku", "location_id")
_ROW_NUMBER = operator.itemgetter(0)  # of a (row number, why) refusal


async def _in_key_order(rows: Sequence[ImportRow]) -> Iterator[ImportRow]:
    """The rows in (sku, location) order: sorted in parts, the loop free in between, and merged
    as they are taken (one sort of 155k rows held the event loop for a quarter of a second)."""
    parts = []
    for i in range(0, len(rows), 10 * IMPORT_SLICE):
        parts.append(sorted(rows[i:i + 10 * IMPORT_SLICE], key=_ROW_KEY))
        await asyncio.sleep(0)
    return heapq.merge(*parts, key=_ROW_KEY)


def _import_refusal(r: ImportRow, row: LockedStock | None) -> DomainError | None:
    """Why an import row cannot be taken (its row locked, None: its location is unknown)."""
    if row is None:
        return NotFound("location", r.location_id,
                        f"rows[{r.row_number}]: location {r.location_id!r} not found")
    if r.on_hand < row.level.reserved:
        return FailedPrecondition(
            f"rows[{r.row_number}]: on_hand {r.on_hand} of {r.sku}@{r.location_id}"
            f" is below the {row.level.reserved} units reserved",
            violation_type="BELOW_RESERVED", subject=f"rows[{r.row_number}]")
    return None


def _stock_event(level: StockLevel) -> tuple[str, str, dict[str, object]]:
    return (level.sku, level.location_id, {
        "on_hand": level.on_hand, "reserved": level.reserved,
        "safety_stock": level.safety_stock, "version": level.version,
    })


class StockService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.returns = ReturnService(ctx)  # ReturnItems: app/returns.py

    # ---- locations -------------------------------------------------------------------------
    async def upsert_locations(
        self, locations: Sequence[Location], idem: Idem | None
    ) -> list[Location] | Replay:
        v = val.Violations()
        if not locations:
            v.add("locations", "at least one location is required")
        val.check_count("locations", len(locations), 10_000)
        val.validate_locations(v, locations)
        v.raise_if_any()
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            old = {
                r["id"]: r["default_safety_stock"]
                for r in await u.conn.fetch(
                    "SELECT id, default_safety_stock FROM locations WHERE id = ANY($1::text[])"
                    " FOR UPDATE", [x.id for x in locations])
            }
            await PgStore.upsert_locations(u.conn, locations)
            changed = [x.id for x in locations if x.id in old and old[x.id] != x.default_safety_stock]
            touched = await self._bump_default_safety(u.conn, changed) if changed else []
            await u.remember(list(locations))
        await self.ctx.refresh_locations()
        await self.ctx.publish(touched)
        return list(locations)

    @staticmethod
    async def _bump_default_safety(conn: object, location_ids: list[str]) -> list[StockLevel]:
        """Rows that follow their location's default get a new version, so Redis takes it."""
        rows = await conn.fetch(  # type: ignore[attr-defined]
            "WITH u AS (UPDATE stock SET version = version + 1"
            " WHERE location_id = ANY($1::text[]) AND safety_stock IS NULL RETURNING *)"
            " SELECT u.sku, u.location_id, u.on_hand, u.reserved, u.version, u.seq,"
            " l.default_safety_stock AS safety FROM u JOIN locations l ON l.id = u.location_id",
            location_ids,
        )
        return [StockLevel(r["sku"], r["location_id"], r["on_hand"], r["reserved"], r["safety"],
                           r["version"], r["seq"]) for r in rows]

    async def list_locations(
        self, ids: Sequence[str], type_: LocationType | None, include_inactive: bool
    ) -> list[Location]:
        v = val.Violations()
        for i, loc_id in enumerate(ids):
            v.location_id(f"ids[{i}]", loc_id)
        v.raise_if_any()
        return await self.ctx.pg.list_locations(ids, type_, include_inactive)

    # ---- stock writes ----------------------------------------------------------------------
    async def set_stock(
        self, sku: str, location_id: str, on_hand: int, expected_version: int | None,
        reason: str, idem: Idem | None,
    ) -> tuple[StockLevel, int] | Replay:
        v = val.Violations()
        v.sku("sku", sku)
        v.location_id("location_id", location_id)
        v.quantity("on_hand", on_hand, allow_zero=True)
        v.text("reason", reason)
        if expected_version is not None and expected_version < 0:
            v.add("expected_version", f"{expected_version} must be >= 0")
        v.raise_if_any()
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            row = await self._lock_one(u.conn, sku, location_id)
            level = row.level
            if expected_version is not None and level.version != expected_version:
                raise Aborted(
                    f"stock {sku}@{location_id} is at version {level.version}, "
                    f"not the expected {expected_version}"
                )
            if on_hand < level.reserved:
                raise FailedPrecondition(
                    f"cannot count {sku}@{location_id} to {on_hand}: {level.reserved} units are"
                    " reserved", violation_type="BELOW_RESERVED", subject=f"{sku}@{location_id}")
            delta = on_hand - level.on_hand
            (new,) = await PgStore.write_levels(u.conn, [replace(level, on_hand=on_hand)])
            if delta:
                await PgStore.add_movements(
                    u.conn, [MovementDraft(sku, location_id, delta, MovementKind.COUNT, reason)],
                    [on_hand])
            await PgStore.add_outbox(u.conn, "STOCK_CHANGED", [_stock_event(new)])
            await u.remember((new, delta))
        await self.ctx.publish([new])
        return new, delta

    async def adjust_stock(
        self, sku: str, location_id: str, delta: int, kind: MovementKind, reason: str,
        idem: Idem | None,
    ) -> StockChange | Replay:
        v = val.Violations()
        v.sku("sku", sku)
        v.location_id("location_id", location_id)
        if delta == 0 or abs(delta) > val.MAX_QUANTITY:
            v.add("delta", f"{delta} must be non-zero and at most {val.MAX_QUANTITY} in size")
        v.text("note", reason)
        v.raise_if_any()
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            level = (await self._lock_one(u.conn, sku, location_id)).level
            if delta < 0:
                check_can_remove(level, -delta)
            (new,) = await PgStore.write_levels(
                u.conn, [replace(level, on_hand=level.on_hand + delta)])
            moves = await PgStore.add_movements(
                u.conn, [MovementDraft(sku, location_id, delta, kind, reason)], [new.on_hand])
            await PgStore.add_outbox(u.conn, "STOCK_CHANGED", [_stock_event(new)])
            result = StockChange(new, tuple(moves))
            await u.remember(result)
        await self.ctx.publish([new])
        return result

    async def transfer_stock(
        self, sku: str, source: str, destination: str, quantity: int, reason: str,
        idem: Idem | None,
    ) -> TransferResult | Replay:
        v = val.Violations()
        v.sku("sku", sku)
        v.location_id("from_location_id", source)
        v.location_id("to_location_id", destination)
        v.quantity("quantity", quantity)
        v.text("reason", reason)
        if source == destination:
            v.add("to_location_id", f"{destination!r} is the same as from_location_id")
        v.raise_if_any()
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            await self._require_stock(u.conn, sku, source)
            rows = await PgStore.lock_stock(u.conn, [(sku, source), (sku, destination)], create=True)
            if (sku, destination) not in rows:
                raise NotFound("location", destination)
            src, dst = rows[(sku, source)].level, rows[(sku, destination)].level
            check_can_remove(src, quantity)
            new_src, new_dst = await PgStore.write_levels(u.conn, [
                replace(src, on_hand=src.on_hand - quantity),
                replace(dst, on_hand=dst.on_hand + quantity),
            ])
            moves = await PgStore.add_movements(u.conn, [
                MovementDraft(sku, source, -quantity, MovementKind.TRANSFER_OUT, reason),
                MovementDraft(sku, destination, quantity, MovementKind.TRANSFER_IN, reason),
            ], [new_src.on_hand, new_dst.on_hand])
            await PgStore.add_outbox(
                u.conn, "STOCK_CHANGED", [_stock_event(new_src), _stock_event(new_dst)])
            result = TransferResult(new_src, new_dst, tuple(moves))
            await u.remember(result)
        await self.ctx.publish([new_src, new_dst])
        return result

    async def set_safety_stock(
        self, sku: str, location_id: str, safety: int | None, idem: Idem | None
    ) -> StockLevel | Replay:
        v = val.Violations()
        v.sku("sku", sku)
        v.location_id("location_id", location_id)
        if safety is not None:
            v.quantity("safety_stock", safety, allow_zero=True)
        v.raise_if_any()
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            await self._lock_one(u.conn, sku, location_id)
            new = await PgStore.write_safety(u.conn, sku, location_id, safety)
            await PgStore.add_outbox(u.conn, "STOCK_CHANGED", [_stock_event(new)])
            await u.remember(new)
        await self.ctx.publish([new])
        return new

    async def import_stock(
        self, rows: Sequence[ImportRow], reason: str, idem: Idem | None
    ) -> ImportResult | Replay:
        """All rows or none, in one transaction, taken a slice of IMPORT_SLICE rows at a time
        (in (sku, location) order, the order every path locks rows in): between slices the
        event loop serves the worker's other calls, which a 100k-row load held up for seconds
        when it was checked, locked and written whole (benchmarks/import_stall.py)."""
        v = val.Violations()
        seen: dict[tuple[str, str], int] = {}
        for i, r in enumerate(rows):
            if i % IMPORT_SLICE == IMPORT_SLICE - 1:
                await asyncio.sleep(0)
            field = f"rows[{r.row_number}]"
            v.sku(f"{field}.sku", r.sku)
            v.location_id(f"{field}.location_id", r.location_id)
            v.quantity(f"{field}.on_hand", r.on_hand, allow_zero=True)
            if r.safety_stock is not None:
                v.quantity(f"{field}.safety_stock", r.safety_stock, allow_zero=True)
            first = seen.setdefault((r.sku, r.location_id), r.row_number)
            if first != r.row_number:
                v.add(field, f"{r.sku}@{r.location_id} already given in row {first}")
            if len(v.items) >= 20:  # enough to fix a file; do not build a huge error
                break
        if not rows:
            v.add("rows", "at least one row is required")
        v.text("reason", reason)
        v.raise_if_any()
        ordered = await _in_key_order(rows)
        async with self.ctx.pg.unit(idem) as u:
            if u.replay is not None:
                return Replay(u.replay)
            changed = 0
            faults: list[tuple[int, DomainError]] = []  # each slice's first refused row
            while part := list(itertools.islice(ordered, IMPORT_SLICE)):
                # after a refusal the later slices are still checked, for an earlier row's
                part_changed, fault = await self._import_slice(
                    u.conn, part, reason, write=not faults)
                changed += part_changed
                faults += [fault] if fault else []
            if faults:
                raise min(faults, key=_ROW_NUMBER)[1]
            await PgStore.add_outbox(u.conn, "STOCK_IMPORTED", [
                ("", "", {"rows": len(rows), "changed": changed})])
            result = ImportResult(len(rows), changed, len({r.sku for r in rows}))
            await u.remember(result)
        # Safety changes bumped versions beyond what we hold: reload the touched SKUs whole.
        skus = sorted({r.sku for r in rows})
        for i in range(0, len(skus), 100):  # 100 SKUs a step, ~4k levels: a short stall
            chunk = skus[i:i + 100]
            await self.ctx.publish(
                lv for levels in (await self.ctx.pg.stock_of_skus(chunk)).values() for lv in levels)
        return result

    @staticmethod
    async def _import_slice(
        conn: asyncpg.Connection, rows: Sequence[ImportRow], reason: str, *, write: bool,
    ) -> tuple[int, tuple[int, DomainError] | None]:
        """Lock (making missing rows) and check a slice of an import, and unless a row of it
        is refused or `write` is False (one before was) write it: the rows it changed, and its
        first refused row by number, with why."""
        bulk = BULK_TIMEOUT_S
        locked = await PgStore.lock_stock(
            conn, [(r.sku, r.location_id) for r in rows], create=True, timeout=bulk)
        faults = [(r.row_number, why) for r in rows
                  if (why := _import_refusal(r, locked.get((r.sku, r.location_id))))]
        if faults or not write:
            return 0, min(faults, key=_ROW_NUMBER, default=None)
        changed: list[StockLevel] = []
        drafts: list[MovementDraft] = []
        for r in rows:
            level = locked[(r.sku, r.location_id)].level
            delta = r.on_hand - level.on_hand
            if delta or level.version == 0:
                changed.append(replace(level, on_hand=r.on_hand))
            if delta:
                drafts.append(MovementDraft(r.sku, r.location_id, delta, MovementKind.IMPORT,
                                            reason))
        news = await PgStore.write_levels(conn, changed, timeout=bulk)
        after = {(n.sku, n.location_id): n.on_hand for n in news}
        await PgStore.add_movements(
            conn, drafts, [after[(d.sku, d.location_id)] for d in drafts], timeout=bulk,
            returning=False)
        safety = [r for r in rows if r.safety_stock is not None]
        if safety:
            await conn.execute(
                "UPDATE stock s SET safety_stock = c.safety, version = s.version + 1"
                " FROM unnest($1::text[], $2::text[], $3::bigint[]) AS c(sku, loc, safety)"
                " WHERE s.sku = c.sku AND s.location_id = c.loc",
                [r.sku for r in safety], [r.location_id for r in safety],
                [r.safety_stock for r in safety], timeout=bulk)
        return len(changed), None

    async def _lock_one(self, conn: asyncpg.Connection, sku: str, location_id: str) -> LockedStock:
        rows = await PgStore.lock_stock(conn, [(sku, location_id)], create=True)
        row = rows.get((sku, location_id))
        if row is None:
            raise NotFound("location", location_id)
        return row

    @staticmethod
    async def _require_stock(conn: object, sku: str, location_id: str) -> None:
        found = await conn.fetchval(  # type: ignore[attr-defined]
            "SELECT 1 FROM stock WHERE sku = $1 AND location_id = $2", sku, location_id)
        if not found:
            raise NotFound("stock", f"{sku}@{location_id}")

    # ---- reads -----------------------------------------------------------------------------
    async def levels_of(self, skus: Sequence[str]) -> dict[str, list[StockLevel]]:
        """Committed levels from Redis, hydrating SKUs Redis does not have."""
        return {sku: decode_levels(sku, fields)
                for sku, fields in (await self.fields_of(skus)).items()}

    async def fields_of(self, skus: Sequence[str], locations: Sequence[str] = ()
                        ) -> dict[str, dict[bytes, bytes]]:
        """Each SKU's Redis hash as stored (with `locations`, those fields of it), hydrating
        SKUs Redis does not have (an unknown SKU: empty)."""
        read = self.ctx.redis.read_fields
        found = dict(zip(skus, await read(skus, locations), strict=True))
        missing = [s for s, fields in found.items() if fields is None]
        if missing:
            await self.ctx.hydrate(missing)
            found.update(zip(missing, await read(missing, locations), strict=True))
        return {s: fields or {} for s, fields in found.items()}

    async def get_availability(
        self, skus: Sequence[str], location_ids: Sequence[str]
    ) -> list[SkuAvailability]:
        v = val.Violations()
        if not skus:
            v.add("skus", "at least one sku is required")
        val.check_count("skus", len(skus), self.ctx.settings.max_skus_per_read)
        for i, sku in enumerate(skus):
            v.sku(f"skus[{i}]", sku)
        for i, loc in enumerate(location_ids):
            v.location_id(f"location_ids[{i}]", loc)
        v.raise_if_any()
        for loc in location_ids:
            await self.ctx.known_location(loc)
        fields = await self.fields_of(list(dict.fromkeys(skus)), list(dict.fromkeys(location_ids)))

        # the locations asked for, or every active one as the cache knows them now
        wanted = set(location_ids) or self.ctx.active_location_ids
        scope = tuple(location_ids) or self.ctx.locations_version
        return [SkuAvailability(sku, fields[sku], scope, wanted) for sku in skus]

    async def find_nearby(
        self, items: Sequence[SkuQuantity], lat: float, lon: float, radius_km: float,
        channel: Channel, limit: int, pickup_only: bool,
    ) -> list[Nearby]:
        v = val.Violations()
        val.validate_items(v, "items", items, self.ctx.settings.max_lines)
        v.coordinates("", lat, lon)
        radius_km = val.nearby_radius(v, radius_km)
        if not 0 <= limit <= 1000:
            v.add("limit", f"{limit} must be between 0 (default 10) and 1000")
        v.raise_if_any()
        levels = await self.levels_of([x.sku for x in items])
        by_loc: dict[str, dict[str, StockLevel]] = {}
        for sku, lvs in levels.items():
            for lv in lvs:
                by_loc.setdefault(lv.location_id, {})[sku] = lv
        out: list[Nearby] = []
        for loc in self.ctx.locations.values():
            if not loc.active or (pickup_only and not loc.can_pickup):
                continue
            stock = by_loc.get(loc.id, {})
            if any(x.sku not in stock or stock[x.sku].available(channel) < x.quantity
                   for x in items):
                continue
            dist = haversine_km(lat, lon, loc.lat, loc.lon)
            if dist <= radius_km:
                out.append(Nearby(loc, dist, tuple(stock[x.sku] for x in items)))
        out.sort(key=lambda n: (n.distance_km, n.location.id))
        return out[: limit or 10]

    async def list_movements(
        self, sku: str, location_id: str, order_ref: str, reservation_id: str, page_size: int,
        page_token: str,
    ) -> tuple[list[Movement], str]:
        v = val.Violations()
        if order_ref or reservation_id:
            v.text("order_ref", order_ref)
            v.text("reservation_id", reservation_id)
        else:
            v.sku("sku", sku)
            v.location_id("location_id", location_id)
        if not 0 <= page_size <= 1000:
            v.add("page_size", f"{page_size} must be between 0 (default 100) and 1000")
        after = 0
        if page_token:
            if not (page_token.startswith("m") and page_token[1:].isdigit()):
                v.add("page_token", f"{quote(page_token)} is not a token this service gave out")
            else:
                after = int(page_token[1:])
        v.raise_if_any()
        size = page_size or 100
        rows = await self.ctx.pg.list_movements(
            sku=sku, location_id=location_id, order_ref=order_ref, reservation_id=reservation_id,
            after_id=after, limit=size + 1)
        token = f"m{rows[size - 1].id}" if len(rows) > size else ""
        return rows[:size], token

