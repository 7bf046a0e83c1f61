"""`inventory-svc serve --workers N`: one supervisor and N serving processes on one port.

One Python process serves on one core (the event loop, protobuf and the Lua replies are all on
it), so a box with more cores runs more processes. The supervisor (this module, the process the
operator started):

1. starts the embedded stores, if no URLs are given (once, for all workers), and holds the port
   (bound with SO_REUSEPORT, never listening: with port 0 it picks the port all workers share);
2. starts N workers: `python -m inventory_svc.cli serve --worker I --supervisor PID` with the
   resolved URLs and port in their environment. Each has its own event loop, pools and warm-up,
   binds the port with SO_REUSEPORT (the kernel spreads new connections over them) and prints
   `worker I pid P serving on HOST:PORT` when SERVING; with `--demo`, worker 0 starts first
   and loads the demo before it serves (health NOT_SERVING meanwhile), and the others start
   once it serves;
3. restarts a worker that dies (at once if it had served, else after a growing pause); a worker
   that dies before it ever served during start-up fails the start (a bad port, an unreachable
   store: restarting would only hide it);
4. on SIGTERM/SIGINT sends SIGTERM to every worker, each drains as a single process does, waits
   for them (SIGKILL after shutdown_delay_s + shutdown_grace_s + STOP_MARGIN_S), then stops the
   embedded stores.

Workers die with the supervisor even when it is killed with SIGKILL (PR_SET_PDEATHSIG). The
sweeper and the reconciler run in one worker at a time, elected through Postgres
(app/background.py `lead`). With metrics on, the workers write theirs to files (prometheus_client
multiprocess mode) and the supervisor serves the sum on INVENTORY_METRICS_PORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from inventory_svc.config import Settings
from inventory_svc.embedded.process import pdeathsig_preexec
from inventory_svc.startup import StartupError, check_port, port_problem

log = logging.getLogger(__name__)
STOP_MARGIN_S = 15.0  # beyond the drain, for closing pools and flushing
MAX_PAUSE_S = 30.0  # the longest pause before restarting a worker that keeps failing


def ready_line(index: int, host: str, port: int) -> str:
    """What a worker prints when it is SERVING (the supervisor waits for it)."""
    return f"worker {index} pid {os.getpid()} serving on {host}:{port}"


def leader_group(supervisor_pid: int) -> str:
    """Names the workers of one supervisor, whose background leader is elected among them: the
    host (a pod's name) and the supervisor's pid, so each pod elects its own."""
    return f"{socket.gethostname()}:{supervisor_pid}"


class WorkerFailed(RuntimeError):
    """A worker exited before it ever served during start-up."""


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Bind host:port with SO_REUSEPORT without listening, for as long as the workers live: with
    port 0 this picks the one port they all bind, and a port another program holds without
    SO_REUSEPORT fails here, once, not in every worker. A socket that never listens is given no
    connections."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@contextlib.contextmanager
def shared_metrics(settings: Settings) -> Iterator[str | None]:
    """With a metrics port: a directory the workers write their metrics to, and the endpoint
    serving their sum (a port bound by one process only: the workers leave it alone)."""
    if not settings.metrics_port:
        yield None
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    path = tempfile.mkdtemp(prefix="inventory-metrics-")
    try:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host,
                                      registry=registry)
        try:
            yield path
        finally:
            server.shutdown()
            server.server_close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    # resolved at the first SERVING (True), or False when it exits before it ever served
    first: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Supervisor:
    """Starts, watches and restarts the workers; see the module doc."""

    def __init__(self, settings: Settings, workers: int, metrics_dir: str | None, *,
                 demo: bool = False) -> None:
        self.settings = settings
        self.demo = demo  # worker 0 loads the demo (when there is none) before it serves
        self.slots = [_Slot(i) for i in range(workers)]
        self.env = _worker_env(settings, workers, metrics_dir)
        self.metrics_dir = metrics_dir
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._halt = asyncio.Event()  # wakes pauses between restarts at shutdown

    async def start(self, indexes: Sequence[int], stop: asyncio.Event) -> None:
        """Start these workers and return when all of them serve (or `stop` is set); raise
        WorkerFailed when one exits before it ever served."""
        slots = [self.slots[i] for i in indexes]
        self._tasks += [asyncio.create_task(self._keep(s)) for s in slots]
        stopping = asyncio.ensure_future(stop.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {s.first for s in slots}
            while waiting:
                done, _ = await asyncio.wait(waiting | {stopping},
                                             return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    return
                for f in done:
                    if not f.result():
                        index = next(s.index for s in slots if s.first is f)
                        raise WorkerFailed(f"worker {index} exited before it served")
                waiting -= done
        finally:
            stopping.cancel()

    async def stop(self) -> None:
        """SIGTERM to every worker; wait for them to drain and exit (SIGKILL when they take
        longer than shutdown_delay_s + shutdown_grace_s + STOP_MARGIN_S)."""
        self._stopping = True
        self._halt.set()
        for slot in self.slots:
            _signal(slot.proc, signal.SIGTERM)
        if not self._tasks:
            return
        _, late = await asyncio.wait(self._tasks,
                                     timeout=self.settings.shutdown_delay_s
                                     + self.settings.shutdown_grace_s + STOP_MARGIN_S)
        if late:
            log.warning("%d worker(s) still running after the drain: killing them", len(late))
            for slot in self.slots:
                _signal(slot.proc, signal.SIGKILL)
            await asyncio.wait(late, timeout=STOP_MARGIN_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots if s.proc is not None]

    async def _keep(self, slot: _Slot) -> None:
        """Run one worker slot: start the worker, forward its output, restart it when it dies."""
        failures = 0
        while not self._stopping:
            try:
                demo = ["--demo"] if self.demo and slot.index == 0 else []
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "inventory_svc.cli", "serve", "--worker",
                    str(slot.index), "--supervisor", str(os.getpid()), *demo, env=self.env,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    # its own process group: Ctrl-C reaches the supervisor only, which stops the
                    # workers in order; PDEATHSIG: no worker outlives a supervisor killed with -9
                    preexec_fn=pdeathsig_preexec(), process_group=0)
            except OSError as exc:  # out of processes or memory: as if it died at once
                log.error("worker %d could not be started: %s", slot.index, exc)
                if not slot.first.done():
                    slot.first.set_result(False)
                    return
                failures += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._halt.wait(), min(MAX_PAUSE_S, 2.0 ** failures))
                continue
            slot.proc = proc
            if self._stopping:  # stop() ran while this one was being started
                _signal(proc, signal.SIGTERM)
            served = await self._forward(slot, proc)
            code = await proc.wait()
            slot.proc = None
            if self.metrics_dir:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    proc.pid, self.metrics_dir)
            if self._stopping:
                return
            if not slot.first.done():
                log.error("worker %d (pid %d) exited with %s before it served", slot.index,
                          proc.pid, code)
                slot.first.set_result(False)
                return
            failures = 0 if served else failures + 1
            pause = min(MAX_PAUSE_S, 0.5 * 2 ** failures) if failures else 0.0
            log.warning("worker %d (pid %d) exited with %s; starting it again%s", slot.index,
                        proc.pid, code, f" in {pause:g}s" if pause else "")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._halt.wait(), pause)

    @staticmethod
    async def _forward(slot: _Slot, proc: asyncio.subprocess.Process) -> bool:
        """Copy the worker's stdout to ours until it closes; True if it said it serves."""
        assert proc.stdout is not None
        marker = f"worker {slot.index} pid {proc.pid} serving"
        served = False
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line beyond the reader's limit: pass it on in pieces
                line = await proc.stdout.read(1 << 16)
            if not line:
                break
            text = line.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            if not served and text.startswith(marker):
                served = True
                if not slot.first.done():
                    slot.first.set_result(True)
        return served


def _signal(proc: asyncio.subprocess.Process | None, sig: int) -> None:
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _worker_env(settings: Settings, workers: int, metrics_dir: str | None) -> dict[str, str]:
    """The supervisor's environment with what it resolved: store URLs (secrets: in the
    environment, never on a command line), the port, the worker count."""
    env = dict(os.environ)
    env.update(INVENTORY_REDIS_URL=settings.redis_url,
               INVENTORY_DATABASE_URL=settings.database_url, INVENTORY_HOST=settings.host,
               INVENTORY_PORT=str(settings.port), INVENTORY_DATA_DIR=str(settings.data_dir),
               INVENTORY_WORKERS=str(workers))
    if metrics_dir is not None:
        env.update(INVENTORY_METRICS_PORT="0", PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    return env


@contextlib.asynccontextmanager
async def _stores(settings: Settings) -> AsyncIterator[Settings]:
    """The embedded stores for the URLs not given. Imported only then: the supervisor serves no
    calls, and server.py brings the solver (numba) with it, ~80 MB the supervisor need not hold."""
    if settings.redis_url and settings.database_url:
        yield settings
        return
    from inventory_svc.server import embedded_stores

    async with embedded_stores(settings) as resolved:
        yield resolved


async def _check_connections(settings: Settings, workers: int) -> None:
    """Warn when the workers' pools (and lock connections) can outgrow what Postgres allows."""
    import asyncpg

    need = workers * (settings.pg_pool_max + 1)
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.pg_timeout_s)
        try:
            allowed = int(await conn.fetchval("SHOW max_connections")) - int(
                await conn.fetchval("SHOW superuser_reserved_connections"))
        finally:
            await conn.close()
    except Exception:  # the workers will say what is wrong with the database
        return
    if need > allowed:
        log.warning("%d workers may open %d Postgres connections (INVENTORY_PG_POOL_MAX %d, and "
                    "one each for the leader election) but the server allows %d: lower "
                    "INVENTORY_PG_POOL_MAX or INVENTORY_WORKERS", workers, need,
                    settings.pg_pool_max, allowed)


async def supervise(settings: Settings, workers: int, *, demo: bool) -> int:
    """Run `workers` serving processes until SIGTERM/SIGINT; the exit code of `serve`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.ExitStack() as held:
        # the port first: a port in use is said at once, before the stores start
        check_port(settings.host, settings.port)  # StartupError: one line (cli.py)
        try:
            port = held.enter_context(reserve_port(settings.host, settings.port))
        except OSError as exc:
            raise StartupError(port_problem(f"{settings.host}:{settings.port}",
                                            exc.strerror or str(exc))) from None
        async with _stores(settings) as resolved:
            metrics_dir = held.enter_context(shared_metrics(resolved))
            resolved = replace(resolved, port=port, workers=workers)
            await _check_connections(resolved, workers)
            return await _run(Supervisor(resolved, workers, metrics_dir, demo=demo), stop, demo)


async def _run(supervisor: Supervisor, stop: asyncio.Event, demo: bool) -> int:
    settings, workers = supervisor.settings, len(supervisor.slots)
    try:
        if demo:  # worker 0 first, which loads the demo before it serves, then the rest
            await supervisor.start([0], stop)
            if not stop.is_set():
                await supervisor.start(range(1, workers), stop)
        else:
            await supervisor.start(range(workers), stop)
        if not stop.is_set():
            print(f"inventory-svc serving gRPC on {settings.host}:{settings.port} ({workers} "
                  f"workers, pids {' '.join(map(str, supervisor.pids))}); Ctrl-C to stop",
                  flush=True)
            await stop.wait()
        print("inventory-svc: shutting down", flush=True)
        return 0
    except WorkerFailed as exc:
        print(f"inventory-svc: {exc}; stopping", file=sys.stderr, flush=True)
        return 1
    finally:
        await supervisor.stop()
