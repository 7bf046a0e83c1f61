"""The two-command promise: `inventory-svc serve` on the embedded default, as a real process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc
import psutil
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import inventory_svc
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


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "inventory_svc.cli", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"inventory-svc {inventory_svc.__version__}"


def _embedded_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("INVENTORY_REDIS_URL", "INVENTORY_DATABASE_URL")}
    # no overload shedding: on a busy CI box the loop of a service loading its demo runs late,
    # and a call shed with RetryInfo is not what these tests are about (test_shedding.py is)
    return {**env, "INVENTORY_QUEUE_BUDGET_MS": "0", **extra}


def _one_line_error(run: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 1 and one line on stderr that says what is wrong: no traceback."""
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("inventory-svc: "), run.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_a_port_in_use_is_one_line_before_any_store_starts() -> None:
    root = Path(tempfile.mkdtemp(prefix="inventory-test-cli-"))
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            for workers in ("1", "2"):  # one process, and the supervisor of two
                data = root / f"data-{workers}"
                run = subprocess.run(
                    [sys.executable, "-m", "inventory_svc.cli", "serve", "--port", str(port),
                     "--workers", workers, "--data-dir", str(data)],
                    capture_output=True, text=True, env=_embedded_env(), timeout=120)
                _one_line_error(run, f"cannot listen on 127.0.0.1:{port}", "--port")
                assert not (data / "postgres").exists() and not (data / "redis").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Serving:
    """`inventory-svc serve ...` as a process; its output collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inventory_svc.cli", "serve", *args], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        self._serving = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "serving gRPC on" in line:
                self._serving.set()
        self._serving.set()

    def wait_serving(self, timeout: float = 300) -> None:
        assert self._serving.wait(timeout) and self.proc.poll() is None, self.text

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    @property
    def text(self) -> str:
        return "".join(self.lines)


# What a normal start (fresh or restarted embedded stores) must not say: alarms for routine work
# (a worker's lines carry "[worker I pid P]" before the logger's name).
ALARM = re.compile(r"(WARNING|ERROR) (\[worker \d+ pid \d+\] )?inventory_svc\.(server|cli|demo|"
                   r"routing_warmup|app\.background|storage\.redis_stock)|Traceback")


def alarms(text: str) -> list[str]:
    return [x for x in text.splitlines() if ALARM.search(x)]


def test_serve_embedded_demo_health_reflection_and_clean_sigterm() -> None:
    # outside pytest's basetemp (see conftest): the postgres user must reach the data dir
    tmp_path = Path(tempfile.mkdtemp(prefix="inventory-test-cli-"))
    data = tmp_path / "data"
    port = free_port()
    env = _embedded_env(INVENTORY_DEMO_SKUS="300", INVENTORY_LOG_LEVEL="INFO")
    svc = Serving(["--port", str(port), "--data-dir", str(data), "--demo"], env)
    children: list[psutil.Process] = []
    try:
        svc.wait_serving()
        children = psutil.Process(svc.proc.pid).children(recursive=True)
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
        # the service reaches its embedded stores over their Unix sockets: no connection of its
        # goes out over TCP, and every client of Valkey came in over its socket
        service = [svc.proc.pid, *(c.pid for c in children
                                   if "postgres" not in c.name() and "valkey" not in c.name())]
        outbound = [c for pid in service for c in psutil.Process(pid).net_connections("tcp")
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr.port != port]
        assert not outbound, outbound
        sock = data / "redis" / "valkey.sock"
        password = (data / "redis" / "valkey.password").read_text().strip()
        with redis.Redis(unix_socket_path=str(sock), password=password) as admin:
            others = [c for c in admin.client_list() if c["id"] != str(admin.client_id())]
        assert others and all(c["laddr"].startswith(str(sock)) for c in others), others
        # the data dir is in use: a migrate or a second serve on it says so in one line
        for args in (["migrate"], ["serve", "--port", str(free_port()), "--workers", "1"]):
            run = subprocess.run(
                [sys.executable, "-m", "inventory_svc.cli", *args, "--data-dir", str(data)],
                capture_output=True, text=True, env=env, timeout=120)
            _one_line_error(run, f"data dir {data} is in use by another inventory-svc (pid "
                                 f"{svc.proc.pid})")
        assert svc.stop() == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"orphaned processes: {alive}"
        first = svc.text
        assert re.search(r"demo: (\d+) of \1 stock rows loaded", first), first
        assert not alarms(first), first
        assert "groups, " not in first  # group-commit statistics are for DEBUG

        # a restart: the embedded stores come back with their data; all routine, no alarm
        svc = Serving(["--port", str(port), "--data-dir", str(data), "--demo"], env)
        svc.wait_serving()
        children = psutil.Process(svc.proc.pid).children(recursive=True)
        assert svc.stop() == 0
        again = svc.text
        assert "loading it from postgres" in again and "the demo network is loaded already" in again
        assert not alarms(again), again
    finally:
        if svc.proc.poll() is None:
            svc.proc.kill()
        for child in children:
            if child.is_running():
                child.kill()
        shutil.rmtree(tmp_path, ignore_errors=True)
