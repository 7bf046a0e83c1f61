"""INVENTORY_TRACING (inventory_svc/tracing.py): a call is one trace through Redis and Postgres;
off, OpenTelemetry is not even imported; asked for without the extra, a one-line error."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import watch_service_pb2 as wp
from inventory.v1 import watch_service_pb2_grpc as wp_grpc
from inventory_svc import tracing
from inventory_svc.config import ConfigError, Settings
from inventory_svc.server import Running
from tests.conftest import Stores, uid
from tests.faults.harness import REPO, ServiceProcess, eventually, make_world, own_site

RESERVE = "/inventory.v1.InventoryService/Reserve"
# what tracing brings in when on: the trace SDK, the instrumentations, the exporter
TRACING_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.instrumentation",
                   "opentelemetry.exporter")
Span = dict[str, Any]


def spans_in(text: str) -> list[Span]:
    """The console exporter's spans: one JSON object a line, among the log lines."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            span = json.loads(line)
            if "context" in span:
                out.append(span)
    return out


def ancestors(span: Span, by_id: dict[str, Span]) -> list[str]:
    """The span ids above `span`, nearest first."""
    out = []
    while span.get("parent_id") in by_id:
        span = by_id[span["parent_id"]]
        out.append(span["context"]["span_id"])
    return out


def assert_one_trace_through_redis_and_postgres(call: Span, spans: list[Span]) -> None:
    """`call`'s trace holds it and, under it, the Redis commands and Postgres statements of a
    Reserve: the hold's EVALSHA and the group commit's statements."""
    assert call["kind"] == "SpanKind.SERVER" and call["attributes"]["rpc.system"] == "grpc"
    trace = {s["context"]["span_id"]: s for s in spans
             if s["context"]["trace_id"] == call["context"]["trace_id"]}
    under = [s for s in trace.values() if call["context"]["span_id"] in ancestors(s, trace)]
    assert len(under) == len(trace) - 1  # one trace: the call and what it did
    assert all(s["kind"] == "SpanKind.CLIENT" for s in under)
    assert "EVALSHA" in {s["name"] for s in under}, sorted(s["name"] for s in under)
    statements = [s for s in under if s["attributes"].get("db.system") == "postgresql"]
    names = [s["name"].rstrip(";") for s in statements]  # asyncpg sends "BEGIN;", "COMMIT;"
    # the group's write: one statement of its own, or in a transaction (the first group of a
    # worker, before it has read Postgres' clock: app/group_commit)
    assert "WITH" in names, names
    assert ("BEGIN" in names) == ("COMMIT" in names), names


async def test_a_reserve_is_one_trace_of_its_grpc_span_with_redis_and_postgres_under_it(
        stores: Stores) -> None:
    # W3C trace contexts a caller sends: one it samples, one it does not
    sampled = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    unsampled = ("1bf7651916cd43dd8448eb211c80319d", "c7ad6b7169203332")
    async with own_site(stores) as site:
        svc = ServiceProcess(site.redis_url, site.database_url, site.root, tracing="console")
        # the instrumentor would OR its own filter of these with ours, and trace the streams
        svc.env["OTEL_PYTHON_GRPC_EXCLUDED_SERVICES"] = "inventory.v1.RoutingService"
        await asyncio.to_thread(svc.start)
        try:
            async with grpc.aio.insecure_channel(svc.target) as ch:
                stub = api_grpc.InventoryServiceStub(ch)
                w = await make_world(stub, locations=1, skus=1, on_hand=10)
                for parent in (None, sampled, unsampled):
                    meta = None if parent is None else (
                        ("traceparent", f"00-{parent[0]}-{parent[1]}-"
                                        f"{'01' if parent is sampled else '00'}"),)
                    got = await stub.Reserve(api.ReserveRequest(
                        lines=[pb.ReservationLine(sku=w.skus[0], location_id=w.locations[0],
                                                  quantity=2)],
                        idempotency_key=uid("cart")), metadata=meta, timeout=30)
                    assert got.reservation.id
                # streams whose handlers write() rather than yield are left untraced, and work
                watch = wp_grpc.WatchServiceStub(ch).WatchStock(
                    wp.WatchStockRequest(skus=w.skus, snapshot=True), timeout=30)
                assert (await watch.read()).WhichOneof("item") == "snapshot"
                watch.cancel()
                health = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(),
                                                              timeout=30)
                assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
                health.cancel()
        finally:
            svc.terminate()
            code = await asyncio.to_thread(svc.wait, 60)
        assert code == 0, svc.log_tail()

        async def exported() -> bool:  # the log pump thread copies what the process wrote
            return svc.log_path.read_text().count(RESERVE) >= 2
        await eventually(exported, within=30, what="the Reserve spans in the service's output")
        spans = spans_in(svc.log_path.read_text())

    calls = [s for s in spans if s["name"] == RESERVE]
    assert len(calls) == 2, calls  # not the call whose caller does not sample it
    new, continued = sorted(calls, key=lambda s: s["parent_id"] is not None)
    # a call without a trace context starts a trace (sampled at the default ratio, 1)
    assert new["parent_id"] is None
    assert_one_trace_through_redis_and_postgres(new, spans)
    # a caller's sampled trace context is continued: the call's span is its caller's child
    assert (continued["context"]["trace_id"], continued["parent_id"]) == (
        f"0x{sampled[0]}", f"0x{sampled[1]}")
    assert_one_trace_through_redis_and_postgres(continued, spans)
    # one it does not sample: nothing of that call (nor of its Redis or Postgres work)
    assert not [s for s in spans if s["context"]["trace_id"] == f"0x{unsampled[0]}"]

    resource = new["resource"]["attributes"]
    assert resource["service.name"] == "inventory-svc"
    assert resource["service.instance.id"].endswith(f":{svc.proc.pid}")  # type: ignore[union-attr]
    # every trace starts at a call: no background statement alone, no health or watch span
    for span in spans:
        assert span["parent_id"] is not None or span["kind"] == "SpanKind.SERVER", span
        assert not span["name"].startswith(("/grpc.", "/inventory.v1.WatchService/")), span


async def test_with_tracing_off_opentelemetry_is_not_loaded(
        service: Running, stub: api_grpc.InventoryServiceStub) -> None:
    w = await make_world(stub, locations=1, skus=1, on_hand=5)
    await stub.Reserve(api.ReserveRequest(lines=[pb.ReservationLine(
        sku=w.skus[0], location_id=w.locations[0], quantity=1)], idempotency_key=uid("cart")))
    assert service.settings.tracing == "" and tracing.setup(service.settings) is None
    # Not "no opentelemetry module at all": redis-py (>= 7) imports OpenTelemetry's metrics API
    # and SDK itself wherever they are installed, for its own observability (off unless the
    # application initialises it). None of what tracing uses is loaded, and nothing is patched.
    assert not [m for m in sys.modules if m.startswith(TRACING_MODULES)]
    assert grpc.aio.server.__module__ == "grpc.aio._server"
    for method in (asyncpg.connection.Connection.fetch, asyncpg.connection.Connection.execute,
                   redis.asyncio.Redis.execute_command, redis.asyncio.client.Pipeline.execute):
        assert not hasattr(method, "__wrapped__"), method


def test_tracing_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="INVENTORY_TRACING='zipkin'"):
        Settings.from_env({"INVENTORY_TRACING": "zipkin"})
    for ratio in ("1.5", "-0.1", "nan"):
        with pytest.raises(ConfigError, match="INVENTORY_TRACING_SAMPLE"):
            Settings.from_env({"INVENTORY_TRACING_SAMPLE": ratio})
    assert Settings.from_env({"INVENTORY_TRACING_SAMPLE": "0.25"}).tracing_sample == 0.25


def test_tracing_without_the_extra_is_a_one_line_configuration_error() -> None:
    # the extra as if not installed: one of its modules will not import
    code = ("import sys; sys.modules['opentelemetry.instrumentation.redis'] = None; "
            "from inventory_svc.cli import main; sys.exit(main(['serve']))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env.update(INVENTORY_TRACING="otlp", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "inventory-svc: configuration error: INVENTORY_TRACING='otlp': tracing needs the "
        "optional extra: pip install 'inventory-svc[tracing]'"), lines
    assert "opentelemetry.instrumentation.redis" in lines[0]
