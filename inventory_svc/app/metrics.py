"""Prometheus metrics of the background work and of the business, beside the per-call ones
(transport/interceptors.py) and the group commit sizes (app/group_commit.py).

The background work runs in one process (the leader of `serve --workers N`), so its gauges are
exported as the most recently set value among live processes (`livemostrecent`): a worker that
lost the lead keeps its old value, and must not win over the new leader's. The business gauges
are computed once per reconciler pass (every INVENTORY_RECONCILE_INTERVAL_S), never per call.
deploy/grafana/inventory.json and deploy/prometheus/alerts.yaml use these names;
tests/test_observability.py checks that every name they use is exported.
"""

from __future__ import annotations

import time
from typing import Final, Protocol

from prometheus_client import Counter, Gauge

from inventory_svc.app.context import Context
from inventory_svc.storage.pg_base import translate_errors

RECONCILE_PASSES = Counter(
    "inventory_reconcile_passes_total",
    "Reconciler rounds: full passes, changes-only passes, and checks of holds due to commit",
    ["kind"])
RECONCILE_STALE = Counter(
    "inventory_reconcile_stale_levels_total",
    "SKU-locations Redis had behind Postgres (a commit's update on its way, or lost): brought"
    " forward")
RECONCILE_REPAIRED = Counter(
    "inventory_reconcile_repaired_total",
    "SKU-locations Redis had wrong (not what Postgres and the hold records say): repaired")
RECONCILE_ORPHANS = Counter(
    "inventory_reconcile_orphans_released_total",
    "Redis holds whose replica died before committing them in Postgres: given back")
REDIS_REBUILDS = Counter(
    "inventory_redis_rebuilds_total",
    "Rebuilds of Redis from Postgres (Redis flushed, restarted empty or from another database)")
KEYED_SHORT = Counter(
    "inventory_keyed_short_total",
    "Keyed Reserve/Sell/RouteAndReserve calls short of stock, by how they learned that their key"
    " has no earlier answer: from Redis's key filter, or by asking Postgres (no filter, not yet"
    " complete, a cluster, or the key's bits all set: a repeat, or the filter filling up)",
    ["by"])
EXPIRED = Counter(
    "inventory_reservations_expired_total", "Reservations the expiry sweeper expired")

_LIVE: Final = "livemostrecent"
OVERDUE_AFTER_S = 60
HOLDS_IN_FLIGHT = Gauge(
    "inventory_holds_in_flight",
    "Redis holds waiting for their Postgres commit, at the last reconciler pass",
    multiprocess_mode=_LIVE)
ACTIVE_RESERVATIONS = Gauge(
    "inventory_reservations_active", "ACTIVE reservations, at the last reconciler pass",
    multiprocess_mode=_LIVE)
UNITS_HELD = Gauge(
    "inventory_units_held", "Units held by ACTIVE reservations, at the last reconciler pass",
    multiprocess_mode=_LIVE)
OVERDUE = Gauge(
    "inventory_reservations_overdue",
    f"ACTIVE reservations past their expiry by more than {OVERDUE_AFTER_S} s (the sweeper is"
    " behind)",
    multiprocess_mode=_LIVE)
LAST_PASS = Gauge(
    "inventory_reconcile_last_pass_timestamp_seconds",
    "Unix time the last reconciler pass (full or changes-only) completed",
    multiprocess_mode=_LIVE)

# One statement, one snapshot: ACTIVE reservations through the sweeper's partial index, and
# their lines by the lines' primary key. The work follows the reservations in flight, not the
# catalogue (a sum over `stock` would read every row).
_BUSINESS = """
SELECT count(*) AS active,
       count(*) FILTER (WHERE r.expires_at < now() - make_interval(secs => $1)) AS overdue,
       COALESCE((SELECT sum(l.quantity)::bigint FROM reservation_lines l JOIN reservations a
                 ON a.id = l.reservation_id WHERE a.status = 'ACTIVE'), 0) AS units
FROM reservations r WHERE r.status = 'ACTIVE'
"""


class PassReport(Protocol):
    """What a reconciler round reports (app/background.py ReconcileReport)."""

    @property
    def stale_levels(self) -> int: ...
    @property
    def repaired(self) -> int: ...
    @property
    def orphans_released(self) -> int: ...
    @property
    def in_flight(self) -> int: ...


def observe_reconcile(report: PassReport, kind: str) -> None:
    """Count a reconciler round; a pass (not a hold check, which sees only a few SKUs) also
    sets the holds in flight and the time of the last pass."""
    RECONCILE_PASSES.labels(kind).inc()
    RECONCILE_STALE.inc(report.stale_levels)
    RECONCILE_REPAIRED.inc(report.repaired)
    RECONCILE_ORPHANS.inc(report.orphans_released)
    if kind != "holds":
        HOLDS_IN_FLIGHT.set(report.in_flight)
        LAST_PASS.set(time.time())


async def refresh_business_gauges(ctx: Context) -> None:
    """Active reservations, units they hold and overdue ones, read from Postgres."""
    with translate_errors():
        row = await ctx.pg.pool.fetchrow(_BUSINESS, float(OVERDUE_AFTER_S),
                                         timeout=ctx.settings.pg_timeout_s)
    assert row is not None  # an aggregate without GROUP BY always has its one row
    ACTIVE_RESERVATIONS.set(row["active"])
    OVERDUE.set(row["overdue"])
    UNITS_HELD.set(row["units"])
