"""The two-command promise: `inventory-svc serve` on the embedded default, as a real process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_help_explains_each_command() -> None:
    out = subprocess.run([sys.executable, "-m", "inventory_svc.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for word in ("serve", "migrate", "demo-load", "INVENTORY_REDIS_URL"):
        assert word in out
    serve = subprocess.run([sys.executable, "-m", "inventory_svc.cli", "serve", "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert "--data-dir" in serve and "--demo" in serve


def test_bad_config_fails_fast_and_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "INVENTORY_SWEEP_INTERVAL_S": "often"}
    run = subprocess.run([sys.executable, "-m", "inventory_svc.cli", "serve", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2
    assert "INVENTORY_SWEEP_INTERVAL_S='often'" in run.stderr


def test_serve_embedded_demo_health_reflection_and_clean_sigterm() -> None:
    # outside pytest's basetemp (see conftest): the postgres user must reach the data dir
    tmp_path = Path(tempfile.mkdtemp(prefix="inventory-test-cli-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("INVENTORY_REDIS_URL", "INVENTORY_DATABASE_URL")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "inventory_svc.cli", "serve", "--port", str(port),
         "--data-dir", str(tmp_path / "data"), "--demo"],
        env={**env, "INVENTORY_DEMO_SKUS": "300"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    children: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # the service says when it serves
            if "serving gRPC" in line:
                break
            assert time.monotonic() < deadline, "service did not start"
        else:
            raise AssertionError(f"service exited: {proc.wait()}")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2, "expected embedded valkey and postgres"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            (answer,) = refl.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for s in answer.list_services_response.service}
            assert "inventory.v1.InventoryService" in names
            stub = api_grpc.InventoryServiceStub(channel)
            locs = stub.ListLocations(api.ListLocationsRequest()).locations
            assert sum(1 for x in locs if x.type == 1) >= 5 and sum(
                1 for x in locs if x.type == 2) >= 100
            got = stub.GetAvailability(api.GetAvailabilityRequest(skus=["SKU-000001"]))
            assert got.items[0].total_on_hand > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"orphaned processes: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in children:
            if child.is_running():
                child.kill()
        shutil.rmtree(tmp_path, ignore_errors=True)
