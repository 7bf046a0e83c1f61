"""Routing inputs and results (DESIGN §5): frozen dataclasses, enums and the input error."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum, IntEnum

MAX_SHIPMENTS_CAP = 10
MAX_LINES = 200
MAX_TOP_K = 10
MAX_ID_LEN = 128
MAX_QTY = 1_000_000_000


class Policy(IntEnum):
    """How the plan is chosen; each one is documented in `routing.solver`."""

    OPTIMAL = 0
    PRIORITY = 1
    CLOSEST = 2
    HIGHEST_STOCK = 3
    FEWEST_SPLITS = 4


class Method(Enum):
    SHIP = "SHIP"
    PICKUP = "PICKUP"


class LocationType(Enum):
    WAREHOUSE = "WAREHOUSE"
    STORE = "STORE"


class ExclusionReason(IntEnum):
    """Why a location is not eligible; the first failing check, in this (value) order.

    CANNOT_PICKUP only ever applies to the pickup location P itself; NO_CAPACITY never does (P's
    own shelf is not a shipment).
    """

    INACTIVE = 1
    CANNOT_PICKUP = 2
    EXCLUDED = 3
    CANNOT_SHIP = 4
    TOO_FAR = 5
    NO_CAPACITY = 6
    NO_STOCK = 7


class RoutingInputError(ValueError):
    """Malformed routing input; the transport maps it to INVALID_ARGUMENT."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownLocationError(RoutingInputError):
    """A referenced location id is not in the network (the transport may map it to NOT_FOUND)."""


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_cost(name: str, value: float) -> None:
    if not _finite(value) or value < 0:
        raise RoutingInputError(name, f"must be a finite number >= 0, got {value!r}")


def _check_coords(lat_name: str, lat: object, lon_name: str, lon: object) -> None:
    if not _finite(lat) or not -90.0 <= lat <= 90.0:  # type: ignore[operator]
        raise RoutingInputError(lat_name, f"must be a finite latitude in [-90, 90], got {lat!r}")
    if not _finite(lon) or not -180.0 <= lon <= 180.0:  # type: ignore[operator]
        raise RoutingInputError(lon_name, f"must be a finite longitude in [-180, 180], got {lon!r}")


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LEN:
        raise RoutingInputError(name, f"must be a non-empty id of at most {MAX_ID_LEN} characters")


@dataclass(frozen=True, slots=True)
class SiteInfo:
    """A location as the solver sees it.

    capacity_left: shipments it may still take today, -1 = unlimited (DESIGN's daily_capacity of
    0 means unlimited: the service passes -1 for it, else daily_capacity minus today's use).
    """

    id: str
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
    capacity_left: int = -1

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        _check_coords("lat", self.lat, "lon", self.lon)
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise RoutingInputError("priority", f"must be an integer, got {self.priority!r}")
        _check_cost("fixed_cost", self.fixed_cost)
        _check_cost("cost_per_km", self.cost_per_km)
        _check_cost("cost_per_unit", self.cost_per_unit)
        if not isinstance(self.capacity_left, int) or self.capacity_left < -1:
            raise RoutingInputError("capacity_left", f"must be >= -1, got {self.capacity_left!r}")


@dataclass(frozen=True, slots=True)
class OrderLine:
    sku: str
    qty: int


@dataclass(frozen=True, slots=True)
class Order:
    """An order to route; `stock` columns passed to the solver follow `lines` order."""

    lines: tuple[OrderLine, ...]
    method: Method = Method.SHIP
    dest_lat: float | None = None
    dest_lon: float | None = None
    pickup_location_id: str | None = None
    max_shipments: int = 3
    split_lines: bool = True
    split_penalty: float = 0.0
    max_distance_km: float | None = None
    policy: Policy = Policy.OPTIMAL
    excluded: frozenset[str] = field(default_factory=frozenset)
    top_k: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "lines", tuple(self.lines))
        object.__setattr__(self, "excluded", frozenset(self.excluded))
        self._validate_lines()
        if self.method is Method.SHIP:
            if self.pickup_location_id is not None:
                raise RoutingInputError("pickup_location_id", "only allowed for PICKUP orders")
            _check_coords("dest_lat", self.dest_lat, "dest_lon", self.dest_lon)
        elif self.method is Method.PICKUP:
            if self.dest_lat is not None or self.dest_lon is not None:
                raise RoutingInputError("dest_lat", "a PICKUP order has no destination point")
            _check_id("pickup_location_id", self.pickup_location_id)
        else:
            raise RoutingInputError("method", f"must be a Method, got {self.method!r}")
        ms = self.max_shipments
        if not isinstance(ms, int) or isinstance(ms, bool) or not 1 <= ms <= MAX_SHIPMENTS_CAP:
            raise RoutingInputError(
                "max_shipments", f"must be an integer in [1, {MAX_SHIPMENTS_CAP}], got {ms!r}"
            )
        if not isinstance(self.split_lines, bool):
            raise RoutingInputError("split_lines", "must be a bool")
        _check_cost("split_penalty", self.split_penalty)
        if self.max_distance_km is not None:
            _check_cost("max_distance_km", self.max_distance_km)
        if not isinstance(self.policy, Policy):
            raise RoutingInputError("policy", f"must be a Policy, got {self.policy!r}")
        for loc in self.excluded:
            _check_id("excluded", loc)
        k = self.top_k
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_K:
            raise RoutingInputError("top_k", f"must be an integer in [0, {MAX_TOP_K}], got {k!r}")

    def _validate_lines(self) -> None:
        if not self.lines:
            raise RoutingInputError("lines", "an order needs at least one line")
        if len(self.lines) > MAX_LINES:
            raise RoutingInputError("lines", f"at most {MAX_LINES} lines, got {len(self.lines)}")
        seen: set[str] = set()
        for i, line in enumerate(self.lines):
            if not isinstance(line, OrderLine):
                raise RoutingInputError(f"lines[{i}]", "must be an OrderLine")
            _check_id(f"lines[{i}].sku", line.sku)
            if line.sku in seen:
                raise RoutingInputError(f"lines[{i}].sku", f"duplicate line for sku {line.sku!r}")
            seen.add(line.sku)
            q = line.qty
            if not isinstance(q, int) or isinstance(q, bool) or not 0 < q <= MAX_QTY:
                raise RoutingInputError(
                    f"lines[{i}].qty", f"must be an integer in [1, {MAX_QTY}], got {q!r}")


@dataclass(frozen=True, slots=True)
class Allocation:
    """Units one location supplies: units[i] of order line i."""

    location_id: str
    units: tuple[int, ...]
    ship_cost: float
    unit_cost: float
    distance_km: float


@dataclass(frozen=True, slots=True)
class Plan:
    """A complete assignment; cost = ship_total + unit_total + split_penalty_total."""

    allocations: tuple[Allocation, ...]
    cost: float
    ship_total: float
    unit_total: float
    split_penalty_total: float
    locations_used: int


@dataclass(frozen=True, slots=True)
class Exclusion:
    location_id: str
    reason: ExclusionReason


@dataclass(frozen=True, slots=True)
class LineShortfall:
    """A line no plan can serve: requested vs the most obtainable for that line on its own."""

    line_index: int
    sku: str
    requested: int
    obtainable: int


@dataclass(frozen=True, slots=True)
class RoutingResult:
    plan: Plan | None
    alternatives: tuple[Plan, ...]
    exclusions: tuple[Exclusion, ...]
    shortfall: tuple[LineShortfall, ...] = ()
    suggested_pickup_ids: tuple[str, ...] = ()
