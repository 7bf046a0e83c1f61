"""A network-latency profile for the stores: a TCP proxy that delivers every chunk a fixed
one-way delay after it arrived, in each direction, in order (`--store-latency postgres=1ms,
redis=0.2ms`: +1 ms each way to Postgres, a round trip 2 ms longer; +0.2 ms each way to Redis;
`standby=1ms` also gives Postgres a synchronous standby 1 ms away, see benchmarks/load/standby.py).

Built not to be the bottleneck of what it measures: one process for every route (the harness
measures its CPU), asyncio protocols (no task, no stream buffer per connection, no task per
chunk), and per route ONE queue in arrival order — every chunk of a route has the same delay,
so arrival order is delivery order, whatever connection a chunk is on. Wake-ups come from a
timerfd armed at the head's due time in nanoseconds: the event loop's own timers round a
sub-millisecond wait up to a whole millisecond (epoll's timeout), which would turn a 0.2 ms
profile into 1 ms. Chunks due together on one connection leave in one write.

    python -m benchmarks.load.latency_proxy --route ours-pg=127.0.0.1:5432@1ms ...

prints one JSON line {"ready": true, "ports": {route: port}}; then each line "stats" on stdin is
answered with one JSON line of counters; end of stdin stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------
# the profile


_SPEC = re.compile(r"^\s*(postgres|redis|standby)\s*=\s*([0-9.]+)\s*(ms|us|µs|s)?\s*$")
_UNIT_S = {"ms": 1e-3, "us": 1e-6, "µs": 1e-6, "s": 1.0, None: 1e-3}


def parse_profile(text: str) -> dict[str, float]:
    """`postgres=1ms,redis=0.2ms` -> {"postgres": 0.001, "redis": 0.0002} (one-way seconds,
    added in each direction; "standby" is the way between Postgres and its synchronous standby);
    "" or "localhost" -> {}."""
    if not text or text.strip() in ("localhost", "none"):
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        m = _SPEC.match(part)
        if not m:
            raise ValueError(f"--store-latency: {part!r} is not STORE=DELAY (STORE postgres, "
                             "redis or standby, DELAY like 1ms, 200us)")
        out[m[1]] = float(m[2]) * _UNIT_S[m[3]]
    return out


def profile_label(delays: dict[str, float]) -> str:
    if not delays or not any(delays.values()):
        return "localhost"
    return ",".join(f"{k}={v * 1e3:g}ms" for k, v in sorted(delays.items()))


# ------------------------------------------------------------------------------------------------
# high-resolution wake-ups


class _Ts(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Its(ctypes.Structure):
    _fields_ = [("it_interval", _Ts), ("it_value", _Ts)]


class _Timerfd:
    """A CLOCK_MONOTONIC timerfd (time.monotonic's clock) armed at absolute times."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self.fd: int = fd
        self._spec = _Its()

    def arm(self, when: float) -> None:
        sec = int(when)
        self._spec.it_value.tv_sec = sec
        self._spec.it_value.tv_nsec = max(1, int((when - sec) * 1e9))  # (0, 0) would disarm
        if self._libc.timerfd_settime(self.fd, 1, ctypes.byref(self._spec), None) != 0:  # ABSTIME
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)


# ------------------------------------------------------------------------------------------------
# the proxy


@dataclass
class _Side:
    """One direction's counters."""

    chunks: int = 0
    bytes: int = 0


@dataclass
class Route:
    """A listener forwarding to one upstream with one delay; its chunks wait in one queue."""

    name: str
    host: str
    port: int
    delay_s: float
    listen_port: int = 0
    queue: deque[tuple[float, _Half, bytes | None]] = field(default_factory=deque)
    up: _Side = field(default_factory=_Side)
    down: _Side = field(default_factory=_Side)
    connections: int = 0
    late_us: list[int] = field(default_factory=lambda: [0] * 64)  # lateness, 25 µs buckets
    timer: Any = None


class _Half(asyncio.Protocol):
    """One socket of a proxied connection; what it receives goes to `other` after the delay."""

    def __init__(self, proxy: Proxy, route: Route, side: _Side) -> None:
        self.proxy, self.route, self.side = proxy, route, side
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.early: list[bytes | None] = []  # received before the upstream socket existed
        self.pending: list[bytes] = []  # due, to be written at the next delivery
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.side.chunks += 1
        self.side.bytes += len(data)
        if self.other is None:
            self.early.append(data)
        else:
            self.proxy.push(self.route, self.other, data)

    def eof_received(self) -> bool:
        self._ended()
        return True  # the transport stays open until the FIN has been passed on

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._ended()

    def _ended(self) -> None:
        if self.other is None:
            self.early.append(None)
        elif not self.other.closing:
            self.proxy.push(self.route, self.other, None)  # the end follows the data

    # the receiving socket's buffer is full: stop reading from the sender, as TCP would
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class Proxy:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for r in self.routes:
            r.timer = _Timerfd()
            loop.add_reader(r.timer.fd, self._fire, r)
            server = await loop.create_server(
                lambda r=r: self._accept(r), "127.0.0.1", r.listen_port, backlog=1024,  # type: ignore[misc]
                reuse_address=True)
            r.listen_port = server.sockets[0].getsockname()[1]
            self._servers.append(server)

    def _accept(self, route: Route) -> _Half:
        client = _Half(self, route, route.up)
        route.connections += 1
        task = asyncio.get_running_loop().create_task(self._connect(route, client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client

    async def _connect(self, route: Route, client: _Half) -> None:
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(
                lambda: _Half(self, route, route.down), route.host, route.port)
        except OSError:
            if client.transport is not None:
                client.transport.abort()
            return
        assert isinstance(upstream, _Half)
        upstream.other, client.other = client, upstream
        for data in client.early:  # what the client sent (or how it ended) meanwhile
            self.push(route, upstream, data)
        client.early = []

    def push(self, route: Route, to: _Half, data: bytes | None) -> None:
        """Queue data (None: the end of the stream) for `to`, due one delay from now."""
        if route.delay_s <= 0 and not route.queue:
            to.pending.append(b"" if data is None else data)
            self._deliver(to)
            return
        route.queue.append((time.monotonic() + route.delay_s, to, data))
        if len(route.queue) == 1:
            route.timer.arm(route.queue[0][0])

    def _fire(self, route: Route) -> None:
        route.timer.clear()
        now = time.monotonic()
        q = route.queue
        touched: dict[int, _Half] = {}
        late = route.late_us
        while q and q[0][0] <= now:
            due, to, data = q.popleft()
            late[min(63, int((now - due) * 40_000))] += 1
            to.pending.append(b"" if data is None else data)
            touched[id(to)] = to
        for to in touched.values():
            self._deliver(to)
        if q:
            route.timer.arm(q[0][0])

    def _deliver(self, to: _Half) -> None:
        """Write what is due for `to` in one write; b"" marks the end of the stream."""
        t = to.transport
        if t is None or to.closing or not to.pending:
            return
        chunks, to.pending = to.pending, []
        end = b"" in chunks
        data = b"".join(chunks)
        if data:
            t.write(data)
        if end:
            to.closing = True
            t.close()  # after the buffered data

    def stats(self) -> dict[str, Any]:
        return {r.name: {"delay_ms": r.delay_s * 1e3, "connections": r.connections,
                         "chunks_up": r.up.chunks, "chunks_down": r.down.chunks,
                         "bytes_up": r.up.bytes, "bytes_down": r.down.bytes,
                         "late_hist": list(r.late_us)} for r in self.routes}


async def _serve(routes: list[Route]) -> None:
    proxy = Proxy(routes)
    await proxy.start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    stdin = sys.stdin.buffer
    buf = bytearray()

    def on_stdin() -> None:
        data = os.read(stdin.fileno(), 4096)
        if not data:
            loop.remove_reader(stdin.fileno())
            done.set()
            return
        buf.extend(data)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if line.strip() == b"stats":
                t = os.times()
                sys.stdout.write(json.dumps({"routes": proxy.stats(),
                                             "cpu_s": t.user + t.system}) + "\n")
                sys.stdout.flush()

    loop.add_reader(stdin.fileno(), on_stdin)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    sys.stdout.write(json.dumps({"ready": True, "ports": {r.name: r.listen_port
                                                          for r in routes}}) + "\n")
    sys.stdout.flush()
    await done.wait()


def _route(text: str) -> Route:
    """NAME=HOST:PORT@DELAY, e.g. ours-pg=127.0.0.1:5432@1ms."""
    m = re.fullmatch(r"([\w.-]+)=([\w.-]+):(\d+)@([0-9.]+)(ms|us|s)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=HOST:PORT@DELAY")
    return Route(m[1], m[2], int(m[3]), float(m[4]) * _UNIT_S[m[5]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load.latency_proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--route", type=_route, action="append", required=True)
    args = p.parse_args(argv)
    asyncio.run(_serve(args.route))


# ------------------------------------------------------------------------------------------------
# the harness's handle on the proxy process


def _child_setup() -> None:
    """preexec_fn: die with the harness; and run ahead of the processes it serves where we may
    (a network does not wait for a busy CPU: on a box the measured systems saturate, a proxy at
    normal priority delivers late by the scheduler's delay, not by the profile). Real-time
    (SCHED_FIFO) where allowed, else a higher priority; the proxy still uses only the CPU its
    chunks need (measured and reported), it is just never kept waiting for it."""
    from benchmarks.load.stack import _die_with_parent

    _die_with_parent()
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.nice(-10)


class ProxyProcess:
    """The proxy as a child process: start it with its routes, read its counters, stop it."""

    def __init__(self, routes: dict[str, tuple[str, int, float]], log_path: Path) -> None:
        """routes: name -> (upstream host, upstream port, one-way delay s)."""
        args = [sys.executable, "-m", "benchmarks.load.latency_proxy"]
        for name, (host, port, delay) in routes.items():
            args += ["--route", f"{name}={host}:{port}@{delay * 1e6:.0f}us"]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                preexec_fn=_child_setup if sys.platform == "linux" else None)
        first = self._line(60.0)
        if not first.get("ready"):
            self.stop()
            raise RuntimeError(f"the latency proxy did not start: {first}")
        self.ports: dict[str, int] = first["ports"]
        self.delays = {name: d for name, (_, _, d) in routes.items()}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise RuntimeError("the latency proxy did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the latency proxy exited ({self.proc.poll()})")
        out: dict[str, Any] = json.loads(line)
        return out

    def stats(self) -> dict[str, Any]:
        """Counters per route since the start, and the proxy's CPU seconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()
        return self._line(10.0)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _bucket_us(hist: list[int], q: float) -> float | None:
    """The upper edge of the 25 µs lateness bucket holding the q-quantile chunk."""
    n, seen = sum(hist), 0
    for i, c in enumerate(hist):
        seen += c
        if n and seen >= q * n:
            return (i + 1) * 25.0
    return None


def stats_delta(before: dict[str, Any], after: dict[str, Any], ops: int,
                wall_s: float) -> dict[str, Any]:
    """What one step cost the proxy: its CPU (% of a core, ms per operation) and, per route,
    chunks and bytes per operation and how late the p99 chunk was (cumulative)."""
    cpu = after["cpu_s"] - before["cpu_s"]
    out: dict[str, Any] = {"cpu_pct": round(100 * cpu / wall_s, 1) if wall_s > 0 else 0.0,
                           "cpu_ms_per_op": round(1000 * cpu / ops, 3) if ops else None,
                           "routes": {}}
    for name, a in after["routes"].items():
        b = before["routes"].get(name, {})
        d: dict[str, Any] = {k: a[k] - b.get(k, 0) for k in
                             ("chunks_up", "chunks_down", "bytes_up", "bytes_down")}
        if not any(d.values()):
            continue
        if ops:
            d["chunks_per_op"] = round((d["chunks_up"] + d["chunks_down"]) / ops, 2)
        hist = [x - y for x, y in zip(a["late_hist"], b.get("late_hist", [0] * 64), strict=True)]
        d["late_p50_us"], d["late_p99_us"] = _bucket_us(hist, 0.5), _bucket_us(hist, 0.99)
        out["routes"][name] = d
    return out


if __name__ == "__main__":
    main()
