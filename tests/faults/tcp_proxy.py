"""A TCP fault proxy for the fault tests: put it between the service and Redis or Postgres.

    with TcpProxy("127.0.0.1", pg_port) as proxy:
        url = f"postgresql://user@127.0.0.1:{proxy.port}/db"
        proxy.set_latency(upstream=0.2)      # every chunk client -> server 200 ms late
        proxy.blackhole()                     # a partition: accept, never forward (data waits)
        proxy.heal()                          # forward again, in order, nothing lost
        proxy.reset()                         # RST every open connection (SO_LINGER 0)
        proxy.cut()                           # FIN every open connection
        proxy.refuse()                        # close the listener: connection refused

It runs its own asyncio loop in a daemon thread, so a test may block, a service may run in
process or as a subprocess, and a fault can be switched from any thread. Everything is bounded:
connections (beyond `max_connections` new ones are closed at once), and the bytes buffered per
direction (beyond `max_buffered` the proxy stops reading, as TCP would).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

_EOF = b""


@dataclass
class ProxyStats:
    accepted: int = 0
    rejected: int = 0  # over max_connections
    reset: int = 0
    cut: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class _Pipe:
    """One direction of one connection: chunks wait here until their delivery time."""

    chunks: deque[tuple[float, bytes]] = field(default_factory=deque)
    buffered: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    room: asyncio.Event = field(default_factory=asyncio.Event)


class _Conn:
    def __init__(self, proxy: TcpProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.c_reader, self.c_writer = reader, writer
        self.u_reader: asyncio.StreamReader | None = None
        self.u_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.main: asyncio.Task[Any] | None = None
        self.closed = False

    async def run(self) -> None:
        p = self.proxy
        self.main = asyncio.current_task()
        try:
            # A blackhole accepts but does not even connect upstream until healed.
            await p._flowing.wait()
            try:
                self.u_reader, self.u_writer = await asyncio.wait_for(
                    asyncio.open_connection(p.target_host, p.target_port), p.connect_timeout)
            except (TimeoutError, OSError):
                self.abort(rst=True)
                return
            up, down = _Pipe(), _Pipe()
            self.tasks = [
                asyncio.create_task(self._read(self.c_reader, up, "up")),
                asyncio.create_task(self._write(up, self.u_writer, "up")),
                asyncio.create_task(self._read(self.u_reader, down, "down")),
                asyncio.create_task(self._write(down, self.c_writer, "down")),
            ]
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            self.abort(rst=False)
            p._conns.discard(self)

    async def _read(self, reader: asyncio.StreamReader, pipe: _Pipe, direction: str) -> None:
        p = self.proxy
        try:
            while True:
                while pipe.buffered >= p.max_buffered:
                    pipe.room.clear()
                    await pipe.room.wait()
                data = await reader.read(p.chunk_size)
                delay = p.latency_up if direction == "up" else p.latency_down
                pipe.chunks.append((time.monotonic() + delay, data))
                pipe.buffered += len(data)
                pipe.wake.set()
                if not data:
                    return
        except (OSError, asyncio.IncompleteReadError):
            pipe.chunks.append((time.monotonic(), _EOF))
            pipe.wake.set()

    async def _write(self, pipe: _Pipe, writer: asyncio.StreamWriter, direction: str) -> None:
        p = self.proxy
        try:
            while True:
                while not pipe.chunks:
                    pipe.wake.clear()
                    await pipe.wake.wait()
                due, data = pipe.chunks[0]
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                await p._flowing.wait()  # a partition holds the data, it does not drop it
                pipe.chunks.popleft()
                pipe.buffered -= len(data)
                pipe.room.set()
                if not data:
                    # the peer closed: pass the FIN on, but keep the other direction open
                    with contextlib.suppress(OSError, RuntimeError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                if direction == "up":
                    p.stats.bytes_up += len(data)
                else:
                    p.stats.bytes_down += len(data)
        except (OSError, RuntimeError):
            self.abort(rst=False)

    def abort(self, *, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            task.cancel()
        if self.main is not None and self.main is not asyncio.current_task():
            self.main.cancel()
        for w in (self.c_writer, self.u_writer):
            if w is None:
                continue
            if rst:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                w.transport.abort()
            else:
                w.close()


class TcpProxy:
    """See the module doc. `port` is where clients connect; faults apply until `heal()`."""

    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0,
                 max_connections: int = 256, max_buffered: int = 4 * 1024 * 1024,
                 chunk_size: int = 64 * 1024, connect_timeout: float = 5.0) -> None:
        self.target_host, self.target_port = target_host, target_port
        self.max_connections = max_connections
        self.max_buffered = max_buffered
        self.chunk_size = chunk_size
        self.connect_timeout = connect_timeout
        self.latency_up = 0.0
        self.latency_down = 0.0
        self.stats = ProxyStats()
        self._port = listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._serving: set[asyncio.Task[Any]] = set()  # one a connection, until it ends
        self._flowing: asyncio.Event
        self._stopped: asyncio.Event

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Self:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def setup() -> None:
                self._flowing = asyncio.Event()
                self._flowing.set()
                self._stopped = asyncio.Event()
                await self._listen()
                ready.set()
                await self._stopped.wait()
                await self._close_all()

            loop.run_until_complete(setup())
            loop.close()

        self._thread = threading.Thread(target=main, name=f"tcp-proxy-{self.target_port}",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("tcp proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    @property
    def connections(self) -> int:
        return len(self._conns)

    # ---- faults ------------------------------------------------------------------------------
    def set_latency(self, upstream: float = 0.0, downstream: float = 0.0) -> None:
        """Delay every chunk client→server by `upstream` and server→client by `downstream`."""
        self.latency_up, self.latency_down = upstream, downstream

    def blackhole(self) -> None:
        """A partition: accept, connect nothing, forward nothing (held, delivered on heal)."""
        self._call(self._set_flowing(False))

    def reset(self) -> int:
        """RST every open connection (both sides); returns how many."""
        return self._call(self._drop_all(rst=True))

    def cut(self) -> int:
        """Close every open connection with a FIN (both sides); returns how many."""
        return self._call(self._drop_all(rst=False))

    def refuse(self) -> None:
        """Stop listening: new connections are refused (open ones stay, see reset/cut)."""
        self._call(self._unlisten())

    def heal(self) -> None:
        """No latency, listening, forwarding: everything held by a blackhole flows on."""
        self.set_latency(0.0, 0.0)
        self._call(self._heal())

    # ---- internals ---------------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self._loop is not None, "proxy not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self._port, reuse_address=True, backlog=512)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _set_flowing(self, on: bool) -> None:
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _heal(self) -> None:
        await self._listen()
        self._flowing.set()

    async def _drop_all(self, *, rst: bool) -> int:
        conns = list(self._conns)
        for c in conns:
            c.abort(rst=rst)
        if rst:
            self.stats.reset += len(conns)
        else:
            self.stats.cut += len(conns)
        return len(conns)

    async def _close_all(self) -> None:
        await self._unlisten()
        await self._drop_all(rst=False)
        # Let every connection's task end before the loop closes: a task destroyed pending logs
        # its traceback from this thread, and CPython 3.11 formatting tracebacks in two threads
        # at once can corrupt its AST state (gh-106905: a later ast.parse raises SystemError).
        tasks = {t for t in self._serving if t is not asyncio.current_task()}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.max_connections:
            self.stats.rejected += 1
            writer.transport.abort()
            return
        self.stats.accepted += 1
        me = asyncio.current_task()
        if me is not None:
            self._serving.add(me)
            me.add_done_callback(self._serving.discard)
        conn = _Conn(self, reader, writer)
        self._conns.add(conn)
        with contextlib.suppress(asyncio.CancelledError):
            await conn.run()
