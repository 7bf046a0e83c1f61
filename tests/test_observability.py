"""The Grafana dashboard and the Prometheus alert rules in deploy/ query only metrics the service
exports, with labels it puts on them; the business and background gauges show what is so.

The service runs as it does in production: `serve` with two workers, whose metrics the
supervisor sums on one /metrics endpoint (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from tests.conftest import Stores
from tests.faults.harness import ServiceProcess, eventually, make_world, own_site

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "inventory.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
# series Prometheus makes itself (not the service's), and labels it adds to every series
PROMETHEUS_OWN = {"up"}
TARGET_LABELS = {"job", "instance"}
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
NAME = re.compile(r"\binventory_[a-z0-9_]+")
BY = re.compile(r"\bby\s*\(([^)]*)\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_queries() -> list[str]:
    """Every PromQL text of the dashboard: panel targets and template variable queries."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                promql = key in ("expr", "definition") or (key == "query" and "(" in str(value))
                if promql and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def alert_queries() -> list[str]:
    """The `expr` of every rule (single-line or a `|` block), read without a YAML library."""
    lines = ALERTS.read_text().splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        head = line.strip()
        if not head.startswith("expr:"):
            continue
        rest = head.removeprefix("expr:").strip()
        if rest != "|":
            out.append(rest)
            continue
        indent = len(line) - len(line.lstrip()) + 2
        block = []
        for more in lines[i + 1:]:
            if more.strip() and len(more) - len(more.lstrip()) < indent:
                break
            block.append(more.strip())
        out.append(" ".join(block))
    return out


def exported(text: str) -> dict[str, set[str]]:
    """Sample name (with _bucket, _count, _total ...) -> the label names it carries."""
    labels: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    return labels


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def value(text: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


def test_the_deploy_files_query_something() -> None:
    """The readers above find the queries (else the live test below would check nothing)."""
    dash, alerts = dashboard_queries(), alert_queries()
    assert len(dash) >= 20 and len(alerts) >= 10, (dash, alerts)
    assert all(q.count("(") == q.count(")") for q in dash + alerts)
    assert {x["title"] for x in json.loads(DASHBOARD.read_text())["panels"]} >= {
        "Calls / s by method", "Latency p99 by method", "Group commit size", "Holds in flight",
        "Drift found and repaired / s", "Redis rebuilds (1 h)", "Active reservations",
        "Units held", "Reservations expired / s", "WatchStock & retention", "Watch events / s",
        "Watch lag p50 / p99 by stage", "Watch backlog (changes not numbered yet)",
        "Open WatchStock streams", "Streams cut off / s", "Retention: rows deleted / s by table"}


async def test_dashboard_and_alerts_use_exported_metrics(stores: Stores) -> None:
    port = free_port()
    async with own_site(stores) as site:
        svc = ServiceProcess(site.redis_url, site.database_url, site.root, workers=2,
                             metrics_port=port, reconcile_interval_s=1)
        await asyncio.to_thread(svc.start)
        try:
            async with grpc.aio.insecure_channel(svc.target) as ch:
                stub = api_grpc.InventoryServiceStub(ch)
                w = await make_world(stub, locations=1, skus=2, on_hand=10)
                loc = w.locations[0]

                def line(i: int, qty: int) -> pb.ReservationLine:
                    return pb.ReservationLine(sku=w.skus[i], location_id=loc, quantity=qty)

                await stub.Reserve(api.ReserveRequest(lines=[line(0, 3)], ttl_seconds=3600))
                sold = (await stub.Reserve(api.ReserveRequest(lines=[line(1, 2)]))).reservation
                await stub.CommitReservation(api.CommitReservationRequest(reservation_id=sold.id))
                await stub.Reserve(api.ReserveRequest(lines=[line(1, 4)], ttl_seconds=1))
                await stub.GetAvailability(api.GetAvailabilityRequest(skus=w.skus))

            text = ""

            async def settled() -> bool:
                # the short reservation expired; one ACTIVE reservation of 3 units is left
                nonlocal text
                text = await asyncio.to_thread(scrape, port)
                assert value(text, "inventory_reservations_expired_total") >= 1
                assert value(text, "inventory_reservations_active") == 1
                assert value(text, "inventory_units_held") == 3
                return True

            await eventually(settled, within=60, what="the gauges of the reservations")
            assert value(text, "inventory_redis_rebuilds_total") >= 1  # a new, empty Redis
            assert value(text, "inventory_reconcile_passes_total") >= 1
            have = exported(text)
            for query in dashboard_queries() + alert_queries():
                for name in set(NAME.findall(query)):
                    assert name in have, f"{name} (in {query!r}) is not exported"
                for name, matchers in SELECTOR.findall(query):
                    if name in PROMETHEUS_OWN:
                        continue
                    used = {m.split("=")[0].rstrip("!~").strip()
                            for m in re.split(r",(?=\s*\w+\s*[!=~])", matchers) if m.strip()}
                    assert used - TARGET_LABELS <= have[name], (name, used, have[name])
                # what it groups by is a label of what it aggregates (or `le`, or the target's)
                carried = set().union(*(have[n] for n in NAME.findall(query))) | TARGET_LABELS
                for group in BY.findall(query):
                    wanted = {x.strip() for x in group.split(",") if x.strip()}
                    assert wanted <= carried, (query, wanted - carried)
        finally:
            svc.terminate()
            await asyncio.to_thread(svc.wait, 60)
