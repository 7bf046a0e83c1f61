"""Who makes a call and what it may do (DESIGN §8): principals, roles, channels, locations, quotas.

Pure rules, no I/O: the transport resolves a principal from an API key or an mTLS identity and
asks these functions; the use cases receive the principal and ask them again where the answer
depends on the request's content (the locations of its lines, the owner of a reservation).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from inventory_svc.domain.errors import PermissionDenied
from inventory_svc.domain.model import Channel


class Role(enum.StrEnum):
    READER = "reader"  # dashboards, search: reads only
    SHOP = "shop"  # e-shop / app / marketplace backends: reads, carts, routing, returns of sales
    POS = "pos"  # a store's terminals: shop + Sell, scoped to its store
    ERP = "erp"  # ERP / WMS jobs: stock, locations, imports, transfers, any reservation
    ADMIN = "admin"  # operators: everything


# WatchStock: a principal scoped to some locations sees only theirs (domain/watch.py)
READ_METHODS = frozenset({"ListLocations", "GetAvailability", "FindNearby", "GetReservation",
                          "ListMovements", "RouteOrder", "WatchStock"})
_SHOP = READ_METHODS | {"Reserve", "ExtendReservation", "ReleaseReservation",
                        "CommitReservation", "ReturnItems", "RouteAndReserve"}
_ERP = READ_METHODS | {"UpsertLocations", "SetStock", "AdjustStock", "ImportStock",
                       "TransferStock", "SetSafetyStock", "ReturnItems", "ReleaseReservation"}
# What each role may call; None: everything.
ROLE_METHODS: dict[Role, frozenset[str] | None] = {
    Role.READER: READ_METHODS,
    Role.SHOP: frozenset(_SHOP),
    Role.POS: frozenset(_SHOP | {"Sell"}),
    Role.ERP: frozenset(_ERP),
    Role.ADMIN: None,
}
# Roles that see and manage every principal's reservations and may book returns with no sale.
MANAGING_ROLES = frozenset({Role.ERP, Role.ADMIN})
# Only a store's own terminals (and operators) act for the POS channel: it sells the safety stock.
POS_ROLES = frozenset({Role.POS, Role.ADMIN})
REMOTE_CHANNELS = (Channel.WEB, Channel.APP, Channel.CALL_CENTER, Channel.MARKETPLACE)


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-principal limits; 0 means no limit. Rates are per replica (a token bucket each)."""

    calls_per_second: float = 0.0
    burst: int = 0  # bucket size; 0: calls_per_second rounded up (at least 1)
    max_active_reservations: int = 0
    max_units_held: int = 0
    max_ttl_s: int = 0  # caps ttl_seconds of Reserve / ExtendReservation / RouteAndReserve
    max_extensions: int = 0  # ExtendReservation calls per reservation


@dataclass(frozen=True, slots=True)
class Principal:
    """A client: its name (owner of its reservations and idempotency keys), role, scope, quotas.

    `locations` and `location_prefixes` empty: the principal may act at every location.
    `channels[0]` is the channel of a call that names none.
    """

    name: str
    role: Role
    channels: tuple[Channel, ...]
    locations: frozenset[str] = frozenset()
    location_prefixes: tuple[str, ...] = ()
    quotas: Quotas = field(default_factory=Quotas)

    @property
    def manages_all(self) -> bool:
        """Sees and manages every principal's reservations (erp, admin)."""
        return self.role in MANAGING_ROLES

    @property
    def scoped(self) -> bool:
        return bool(self.locations or self.location_prefixes)

    @property
    def owner(self) -> str | None:
        """The owner a reservation lookup is limited to; None: any owner."""
        return None if self.manages_all else self.name

    def may_call(self, method: str) -> bool:
        allowed = ROLE_METHODS[self.role]
        return allowed is None or method in allowed

    def may_act_at(self, location_id: str) -> bool:
        if not self.scoped:
            return True
        return location_id in self.locations or location_id.startswith(self.location_prefixes)

    def require_locations(self, location_ids: Iterable[str], what: str = "location") -> None:
        """PERMISSION_DENIED naming the first location outside the principal's scope."""
        for loc in location_ids:
            if not self.may_act_at(loc):
                raise PermissionDenied(
                    f"principal {self.name!r} may not act at {what} {_short(loc)!r}")

    def channel_for(self, requested: Channel | None) -> Channel:
        """The call's channel: the principal's own unless the call names another it may use."""
        if requested is None:
            return self.channels[0]
        if requested not in self.channels:
            raise PermissionDenied(
                f"principal {self.name!r} may not act for channel {requested.value}"
                f" (allowed: {', '.join(c.value for c in self.channels)})")
        return requested


def default_channels(role: Role) -> tuple[Channel, ...]:
    return (Channel.POS,) if role is Role.POS else REMOTE_CHANNELS + (
        (Channel.POS,) if role is Role.ADMIN else ())


def principal(name: str, role: Role, *, channels: Iterable[Channel] = (),
              locations: Iterable[str] = (), location_prefixes: Iterable[str] = (),
              quotas: Quotas | None = None) -> Principal:
    """A checked principal: raises ValueError naming what is wrong (used at config load)."""
    chans = tuple(dict.fromkeys(channels)) or default_channels(role)
    if Channel.POS in chans and role not in POS_ROLES:
        raise ValueError(f"principal {name!r}: only pos and admin principals act for POS")
    p = Principal(name, role, chans, frozenset(locations), tuple(location_prefixes),
                  quotas or Quotas())
    if role is Role.POS and not p.scoped:
        raise ValueError(f"principal {name!r}: a pos principal needs its store "
                         "(locations or location_prefixes)")
    return p


# With no keys configured (loopback only, see config): one principal that may do everything.
ANONYMOUS = Principal("", Role.ADMIN, (*REMOTE_CHANNELS, Channel.POS))


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
