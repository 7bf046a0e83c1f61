"""p50/p99 of N sequential Reserve calls on the embedded default, beside a bare grpc.aio echo
measured in the same run (issue 2's figure). Both servers run as their own processes.

    python -m benchmarks.reserve_latency --calls 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], ready: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if ready in line:
            return proc
    raise RuntimeError(f"{args} exited before '{ready}'")


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples_s, n=1000, method="inclusive")
    return {"p50_ms": q[499] * 1e3, "p99_ms": q[989] * 1e3, "mean_ms": statistics.fmean(samples_s) * 1e3}


async def _measure(calls: int, svc: str, echo: str, keyed: bool) -> dict[str, dict[str, float]]:
    async with grpc.aio.insecure_channel(svc) as ch, grpc.aio.insecure_channel(echo) as ech:
        stub = api_grpc.InventoryServiceStub(ch)
        loc = "BENCH-1"
        await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[pb.Location(
            id=loc, name="bench", type=pb.LOCATION_TYPE_WAREHOUSE, lat=52.2, lon=21.0,
            active=True, can_ship=True)]))
        skus = [f"BENCH-SKU-{i:03d}" for i in range(100)]
        for sku in skus:
            await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=10**9))
        echo_call = ech.unary_unary("/bench.Echo/Echo")
        rng = random.Random(1)
        requests = [api.ReserveRequest(
            lines=[pb.ReservationLine(sku=rng.choice(skus), location_id=loc, quantity=1)],
            ttl_seconds=900, channel=pb.CHANNEL_WEB,
            idempotency_key=f"bench-{time.time_ns()}-{i}" if keyed else "") for i in range(calls)]
        payload = requests[0].SerializeToString()
        for r in requests[:200]:  # warm both paths
            await stub.GetAvailability(api.GetAvailabilityRequest(skus=[r.lines[0].sku]))
            await echo_call(payload)
        reserve_s, echo_s = [], []
        # interleave so both see the same machine noise
        for r in requests:
            t0 = time.perf_counter()
            await stub.Reserve(r)
            t1 = time.perf_counter()
            await echo_call(payload)
            t2 = time.perf_counter()
            reserve_s.append(t1 - t0)
            echo_s.append(t2 - t1)
    return {"Reserve": _percentiles(reserve_s), "echo": _percentiles(echo_s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--no-key", action="store_true", help="Reserve without idempotency keys")
    args = p.parse_args()
    svc_port, echo_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as data:
        env_free = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
        os.environ.clear()
        os.environ.update(env_free)
        svc = _start([sys.executable, "-m", "inventory_svc.cli", "serve", "--port", str(svc_port),
                      "--data-dir", str(Path(data) / "d")], "serving gRPC")
        echo = _start([sys.executable, "-m", "benchmarks.echo_server", "--port", str(echo_port)],
                      "echo ready")
        try:
            res = asyncio.run(_measure(args.calls, f"127.0.0.1:{svc_port}",
                                       f"127.0.0.1:{echo_port}", keyed=not args.no_key))
        finally:
            for proc in (svc, echo):
                proc.terminate()
                proc.wait(timeout=60)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"machine: {os.cpu_count()} cores, {cpu}; python {platform.python_version()}")
    print(f"{args.calls} sequential calls, idempotency keys: {not args.no_key}")
    print("| call | p50 ms | p99 ms | mean ms |\n|---|---|---|---|")
    for name, q in res.items():
        print(f"| {name} | {q['p50_ms']:.3f} | {q['p99_ms']:.3f} | {q['mean_ms']:.3f} |")
    r, e = res["Reserve"], res["echo"]
    print(f"ratio Reserve/echo: p50 {r['p50_ms'] / e['p50_ms']:.1f}x, p99 {r['p99_ms'] / e['p99_ms']:.1f}x")


if __name__ == "__main__":
    main()
