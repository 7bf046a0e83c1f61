"""Routing use cases (DESIGN §5): the solver runs in process on cached location arrays and on
availability read from Redis, in worker threads (its numba kernels release the GIL) so a long
solve never stalls the event loop; RouteAndReserve reserves the plan through the core
reservation path and takes a shipment of the day's capacity of each location it ships from in
the same transaction (given back if the reservation ends without shipping: see
ReservationService.release / expire_due). A scoped principal routes over its own locations."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

import numpy as np

from inventory_svc.app.context import Context
from inventory_svc.app.reservations import ReservationService
from inventory_svc.app.stock import StockService
from inventory_svc.domain import validation as val
from inventory_svc.domain.errors import (
    CapacityTaken,
    FailedPrecondition,
    FieldViolation,
    InsufficientStock,
    InvalidArgument,
    NotFound,
    Shortfall,
)
from inventory_svc.domain.model import Channel, Line, LocationType, Reservation, available_units
from inventory_svc.domain.principal import ANONYMOUS, Principal
from inventory_svc.storage.pg_base import Idem, Replay, translate_errors
from inventory_svc.storage.redis_layout import gate_units
from routing import model as rm
from routing.solver import Network, solve

log = logging.getLogger(__name__)
COLUMNS_KEPT = 4096


@dataclass(frozen=True, slots=True)
class RoutedReservation:
    plan: rm.Plan
    order: rm.Order
    reservation: Reservation
    attempts: int


def _site_type(kind: LocationType) -> rm.LocationType:
    return rm.LocationType.WAREHOUSE if kind is LocationType.WAREHOUSE else rm.LocationType.STORE


def plan_lines(order: rm.Order, plan: rm.Plan) -> list[Line]:
    return [Line(order.lines[j].sku, a.location_id, units)
            for a in plan.allocations for j, units in enumerate(a.units) if units > 0]


def no_plan_error(order: rm.Order, result: rm.RoutingResult) -> InsufficientStock:
    shorts = tuple(Shortfall(s.sku, "*", s.requested, s.obtainable) for s in result.shortfall)
    if not shorts:  # every line exists somewhere, but not together within the constraints
        shorts = tuple(Shortfall(x.sku, "*", x.qty, 0) for x in order.lines)
    return InsufficientStock(shorts)


class RoutingService:
    def __init__(self, ctx: Context, stock: StockService, reservations: ReservationService) -> None:
        self.ctx = ctx
        self.stock = stock
        self.reservations = reservations
        self._network: Network | None = None
        self._network_version = -1
        # Each SKU's column of the stock matrix (units per network location for a channel),
        # kept with the change count of the SKU's Redis hash it was made at: an unchanged SKU
        # costs one field's read instead of its whole hash (500 fields) and their decoding.
        # Bounded; the oldest goes first.
        self._columns: dict[tuple[str, Channel, int], tuple[bytes, np.ndarray]] = {}
        self._daily_capacity = np.zeros(0, np.int64)
        # Solves at once, each in a worker thread: a 200-line order on the event loop stalled
        # every other call for over a second. Bounded, so routing cannot take every core.
        self._solver_slots = asyncio.Semaphore(max(1, self.ctx.settings.routing_concurrency))
        self._solving = 0
        # the locations outside a scope, by scope (locations, prefixes), for this network
        self._outside: dict[tuple[frozenset[str], tuple[str, ...]], frozenset[str]] = {}
        self._outside_version = -1

    @property
    def solving(self) -> int:
        """Solves running in worker threads now."""
        return self._solving

    def network(self) -> Network:
        """The solver's arrays, rebuilt only when the locations changed (not per request)."""
        if self._network is None or self._network_version != self.ctx.locations_version:
            locs = sorted(self.ctx.locations.values(), key=lambda x: x.id)
            self._network = Network([
                rm.SiteInfo(x.id, _site_type(x.type), x.lat, x.lon, x.can_ship, x.can_pickup,
                            x.active, x.priority, x.fixed_cost, x.cost_per_km, x.cost_per_unit)
                for x in locs])
            self._daily_capacity = np.array([x.daily_capacity for x in locs], np.int64)
            self._network_version = self.ctx.locations_version
        return self._network

    def check_order(self, order: rm.Order) -> None:
        v = val.Violations()
        val.check_count("order.lines", len(order.lines), self.ctx.settings.max_lines)
        for i, line in enumerate(order.lines):
            v.sku(f"order.lines[{i}].sku", line.sku)
            v.quantity(f"order.lines[{i}].quantity", line.qty)
        v.raise_if_any()
        if order.pickup_location_id is not None:
            self.ctx.location(order.pickup_location_id)

    async def capacity_left(self, network: Network) -> np.ndarray:
        """Shipments each location may still take today (-1: no limit)."""
        if not (self._daily_capacity > 0).any():  # no limits anywhere: nothing to read
            return np.full(network.size, -1, np.int64)
        with translate_errors():  # Postgres unreachable: UNAVAILABLE, not INTERNAL
            rows = await self.ctx.pg.pool.fetch(
                "SELECT location_id, used FROM capacity_usage WHERE day = current_date")
        used = np.zeros(network.size, np.int64)
        for r in rows:
            i = network.index.get(r["location_id"])
            if i is not None:
                used[i] = r["used"]
        return np.where(self._daily_capacity > 0, np.maximum(self._daily_capacity - used, 0), -1)

    async def stock_matrix(self, network: Network, order: rm.Order, channel: Channel) -> np.ndarray:
        """Units available to the channel per (location, line), from Redis in one pipeline.
        Holds in flight count as taken: a plan is made of units a hold can still get."""
        skus = [x.sku for x in order.lines]
        # Only the hashes changed since their column was made are read whole: the others are
        # known by their change count (one field each, storage/lua/bump.lua).
        marks = await self.ctx.redis.markers(skus)
        # taken out first: making the stale columns may push kept ones out of the cache
        columns = {s: kept for s, mark in zip(skus, marks, strict=True)
                   if (kept := self._kept(s, channel, mark)) is not None}
        stale = [s for s in dict.fromkeys(skus) if s not in columns]
        if stale:
            fields = await self.stock.fields_of(stale)
            for sku in stale:
                columns[sku] = self._column(network, sku, channel, fields[sku])
        matrix = np.zeros((network.size, len(skus)), np.int64)
        for j, sku in enumerate(skus):
            matrix[:, j] = columns[sku]
        return matrix

    def _kept(self, sku: str, channel: Channel, mark: bytes | None) -> np.ndarray | None:
        """The SKU's column, if made from the hash at this change count."""
        kept = self._columns.get((sku, channel, self._network_version))
        return kept[1] if kept is not None and mark is not None and kept[0] == mark else None

    def _column(self, network: Network, sku: str, channel: Channel,
                fields: dict[bytes, bytes]) -> np.ndarray:
        key = (sku, channel, self._network_version)
        column = np.zeros(network.size, np.int64)
        for loc, on_hand, taken, safety in gate_units(fields):
            i = network.index.get(loc)
            if i is not None:
                column[i] = available_units(on_hand, taken, safety, channel)
        self._columns.pop(key, None)
        if len(self._columns) >= COLUMNS_KEPT:
            del self._columns[next(iter(self._columns))]
        # kept by the change count the fields were read at (an unhydrated SKU's: none)
        mark = fields.get(b"_")
        if mark is not None:
            self._columns[key] = (mark, column)
        return column

    def outside_scope(self, principal: Principal) -> frozenset[str]:
        """The locations a scoped principal may not act at (empty for an unscoped one)."""
        if not principal.scoped:
            return frozenset()
        if self._outside_version != self.ctx.locations_version:
            self._outside.clear()
            self._outside_version = self.ctx.locations_version
        key = (principal.locations, principal.location_prefixes)
        found = self._outside.get(key)
        if found is None:
            found = frozenset(x for x in self.ctx.locations if not principal.may_act_at(x))
            self._outside[key] = found
        return found

    async def _solve(self, network: Network, order: rm.Order, stock: np.ndarray,
                     capacity: np.ndarray) -> rm.RoutingResult:
        """`solve` in a worker thread, at most routing_concurrency at once. A call given up
        (cancelled) keeps its slot until its thread ends, so the bound holds on threads."""
        await self._solver_slots.acquire()
        self._solving += 1
        task = asyncio.ensure_future(asyncio.to_thread(solve, network, order, stock, capacity))

        def done(_: object) -> None:
            self._solving -= 1
            self._solver_slots.release()

        task.add_done_callback(done)
        return await asyncio.shield(task)

    async def route(self, order: rm.Order, channel: Channel, *,
                    principal: Principal = ANONYMOUS) -> rm.RoutingResult:
        """Route over the locations the principal may act at: for a scoped one the others are
        excluded, and the answer names none of them (exclusions, suggested pickup stores)."""
        if not self.ctx.locations:
            await self.ctx.refresh_locations()
        self.check_order(order)
        network = self.network()
        outside = self.outside_scope(principal)
        if outside:
            order = replace(order, excluded=order.excluded | outside)
        stock = await self.stock_matrix(network, order, channel)
        capacity = await self.capacity_left(network)
        try:
            result = await self._solve(network, order, stock, capacity)
        except rm.UnknownLocationError as exc:
            raise NotFound("location", str(order.pickup_location_id)) from exc
        except rm.RoutingInputError as exc:
            raise InvalidArgument([FieldViolation(f"order.{exc.field}", exc.message)]) from exc
        if outside:
            result = replace(
                result,
                exclusions=tuple(x for x in result.exclusions if x.location_id not in outside),
                suggested_pickup_ids=tuple(
                    x for x in result.suggested_pickup_ids if x not in outside))
        return result

    async def route_and_reserve(
        self, order: rm.Order, channel: Channel, ttl_s: int, order_ref: str, idem: Idem | None,
        *, principal: Principal = ANONYMOUS,
    ) -> RoutedReservation | Replay:
        v = val.Violations()
        val.validate_ttl(v, "ttl_seconds", ttl_s, self.ctx.settings.min_ttl_s,
                         self.ctx.settings.max_ttl_s)
        v.text("order_ref", order_ref)
        v.raise_if_any()
        pickup = order.pickup_location_id
        if pickup is not None:  # a scoped principal's customers collect at its own stores
            principal.require_locations([pickup], "pickup location")
        ttl = self.reservations.ttl_within_quota(principal, ttl_s)
        if replay := await self.reservations.check_holding_quotas(
                principal, sum(x.qty for x in order.lines), idem):
            return replay
        last: FailedPrecondition | None = None
        for attempt in range(1, self.ctx.settings.route_attempts + 1):
            result = await self.route(order, channel, principal=principal)
            if result.plan is None:
                raise no_plan_error(order, result)
            plan = result.plan
            # the pickup store handing over units from its own shelf ships nothing: it takes
            # none of its shipments of the day (only transfers to it do, from where they leave)
            used = sorted(a.location_id for a in plan.allocations if a.location_id != pickup)

            def answer(res: Reservation, plan: rm.Plan = plan, n: int = attempt) -> RoutedReservation:
                return RoutedReservation(plan, order, res, n)

            try:
                out: RoutedReservation | Replay = await self.reservations.reserve_routed(
                    plan_lines(order, plan), ttl, channel, order_ref, idem, used, answer,
                    principal=principal)
                return out
            except (InsufficientStock, CapacityTaken) as exc:
                log.info("route attempt %d lost a race (%s); routing again", attempt, exc.message)
                last = exc
        assert last is not None
        raise last
