"""The `inventory-svc` command: serve, migrate, demo-load, watch.

What an operator must fix (a data dir or port in use, a bad setting, an embedded server that will
not start) is said in one line on stderr, exit status 1 (2 for configuration); a traceback is for
bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from inventory_svc import __version__
from inventory_svc.config import ConfigError, Settings
from inventory_svc.cpus import usable_cpus
from inventory_svc.redact import RedactingFilter, redact

if TYPE_CHECKING:
    from inventory_svc.server import Running

log = logging.getLogger(__name__)

DESCRIPTION = """\
Real-time omnichannel inventory and order-routing service.

Configuration comes from INVENTORY_* environment variables (see README). Without
INVENTORY_REDIS_URL / INVENTORY_DATABASE_URL the service starts an embedded Valkey
(Redis-compatible) server and an embedded PostgreSQL, keeping their data under --data-dir.
"""


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record), "level": record.levelname,
                 "logger": record.name, "pid": record.process, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(settings: Settings, worker: int | None = None) -> None:
    handler = logging.StreamHandler()
    # the workers of `serve --workers N` share the supervisor's stderr: each line names its own
    tag = "" if worker is None else f"[worker {worker} pid {os.getpid()}] "
    handler.setFormatter(JsonLogFormatter() if settings.log_format == "json" else logging.Formatter(
        f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())  # no store password in any log line
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inventory-svc", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"inventory-svc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="run the gRPC service (embedded stores unless URLs are set)",
                       description="Run the gRPC service until SIGTERM or Ctrl-C: --workers "
                                   "processes on the one port (default: one per usable CPU), "
                                   "the embedded stores started once for all of them.")
    s.add_argument("--port", type=int, help="gRPC port (default: INVENTORY_PORT or 50051)")
    s.add_argument("--host", help="bind address (default: INVENTORY_HOST or 127.0.0.1)")
    s.add_argument("--data-dir", type=Path,
                   help="where embedded Redis/Postgres keep their data (default: .data)")
    s.add_argument("--demo", action="store_true",
                   help="load the demo network (Polish cities, 10k SKUs) if no locations exist")
    s.add_argument("--workers", type=int,
                   help="serving processes sharing the port (default: INVENTORY_WORKERS, or 0: "
                        "one per CPU this process may use, cgroup quota included)")
    # set by the supervisor on the workers it starts (inventory_svc/workers.py)
    s.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    s.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    m = sub.add_parser("migrate", help="apply database migrations and exit",
                       description="Apply pending Postgres migrations (safe to run concurrently).")
    m.add_argument("--data-dir", type=Path, help="embedded Postgres data dir when no URL is set")
    d = sub.add_parser("demo-load", help="load the demo network into a running service",
                       description="Upsert the demo locations and import their stock over gRPC. "
                                   "Refuses when the service already holds stock of the demo's "
                                   "SKUs at its locations, unless --force.")
    d.add_argument("--target", default="127.0.0.1:50051", help="service address host:port")
    d.add_argument("--skus", type=int, default=10_000, help="number of demo SKUs")
    d.add_argument("--seed", type=int, default=7, help="random seed of the demo network")
    d.add_argument("--api-key", default=os.environ.get("INVENTORY_DEMO_API_KEY", ""),
                   help="an erp/admin key when the service has principals "
                        "(default: INVENTORY_DEMO_API_KEY)")
    d.add_argument("--force", action="store_true",
                   help="load even when the service holds stock of the demo's SKUs at its "
                        "locations (their counts are overwritten)")
    from inventory_svc.watch_cli import add_parser as add_watch

    add_watch(sub)  # `watch`: print the stock event stream (inventory_svc/watch_cli.py)
    return p


def demo_refusal(settings: Settings) -> str | None:
    """Why `--demo` cannot load into this service, if it cannot."""
    if settings.tls_cert or settings.api_keys or settings.principals_file:
        return ("inventory-svc: --demo loads only into an open plaintext service; use "
                "`inventory-svc demo-load --api-key ...`")
    return None


class _Stopper:
    """SIGTERM/SIGINT: once serving, set `stop` (the service drains and stops in order); while
    starting (a Redis rebuild, the demo load), cancel the start, which unwinds in order too."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.serving = False
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled)

    def _signalled(self) -> None:
        if not self.serving and not self.stop.is_set() and self._task is not None:
            self._task.cancel()  # once: a second signal must not cut the unwinding short
        self.stop.set()


def _demo_loader(settings: Settings) -> Callable[[Running], Awaitable[None]]:
    """`serve --demo`: load the demo before inventory serves (health NOT_SERVING meanwhile)."""
    from inventory_svc.demo import demo_wanted, load_demo_into

    async def prepare(running: Running) -> None:
        if (refusal := demo_refusal(running.settings)) is not None:
            print(refusal, file=sys.stderr, flush=True)
            return
        wanted, why = await demo_wanted(running.stock, sku_count=settings.demo_skus)
        if not wanted:
            log.info("demo: not loading it: %s", why)
            return
        log.info("demo: %s", why)
        running.gate.starting("the service is starting: loading the demo network; retry "
                              "shortly", 2.0)
        await load_demo_into(running.stock, sku_count=settings.demo_skus)
        await running.ctx.refresh_locations()
    return prepare


def _serving_line(host: str, running: Running) -> str:
    routing = ("" if running.routing_ready.is_set()
               else "; routing joins once its solver is in (see the log)")
    return (f"inventory-svc serving gRPC on {host}:{running.port} "
            f"({len(running.ctx.locations)} locations){routing}; Ctrl-C to stop")


async def _say_when_routing_serves(running: Running) -> None:
    await running.routing_ready.wait()
    print("inventory-svc: routing serves too (inventory.v1.RoutingService SERVING)", flush=True)


async def _serve(settings: Settings, demo: bool) -> None:
    from inventory_svc.server import embedded_stores, serve
    from inventory_svc.startup import check_port

    stopper = _Stopper()
    check_port(settings.host, settings.port)  # before the stores start, not after
    prepare = _demo_loader(settings) if demo else None
    try:
        async with embedded_stores(settings) as resolved, serve(
                resolved, routing_in_background=True, prepare=prepare) as running:
            stopper.serving = True
            print(_serving_line(resolved.host, running), flush=True)
            routing = None if running.routing_ready.is_set() else asyncio.create_task(
                _say_when_routing_serves(running))
            await stopper.stop.wait()
            if routing is not None:
                routing.cancel()
            print("inventory-svc: shutting down", flush=True)
    except asyncio.CancelledError:
        if not stopper.stop.is_set():
            raise
        print("inventory-svc: stopped while starting", flush=True)


async def _serve_worker(settings: Settings, index: int, supervisor: int, demo: bool) -> None:
    """One of `serve --workers N`'s processes: the stores are the supervisor's, the background
    work runs while this worker leads (app/background.py); the demo, if asked for, is loaded by
    worker 0 before it serves (the supervisor starts the others after it)."""
    from inventory_svc.app.background import leader_lock
    from inventory_svc.server import serve
    from inventory_svc.workers import leader_group, ready_line

    stopper = _Stopper()
    prepare = _demo_loader(settings) if demo else None
    try:
        async with serve(settings, background_lock=leader_lock(leader_group(supervisor)),
                         routing_in_background=True, prepare=prepare) as running:
            stopper.serving = True
            print(ready_line(index, settings.host, running.port), flush=True)
            await stopper.stop.wait()
    except asyncio.CancelledError:
        if not stopper.stop.is_set():
            raise


async def _migrate(settings: Settings) -> None:
    from inventory_svc.server import embedded_stores
    from inventory_svc.storage.pg import PgStore

    async with embedded_stores(settings, redis=False) as resolved:
        pg = await PgStore.connect(resolved.database_url, min_size=1, max_size=1, timeout_s=30)
        try:
            applied = await pg.migrate()
        finally:
            await pg.close()
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = {k: getattr(args, k, None) for k in ("port", "host", "data_dir", "workers")}
        settings = Settings.from_env(**overrides)
    except ConfigError as exc:
        print(f"inventory-svc: configuration error: {redact(str(exc))}", file=sys.stderr)
        return 2
    _configure_logging(settings, getattr(args, "worker", None))
    from inventory_svc.demo import DemoRefused
    from inventory_svc.embedded import EmbeddedServerError
    from inventory_svc.startup import StartupError

    try:
        return _run(args, settings)
    except (StartupError, EmbeddedServerError, DemoRefused) as exc:
        # a problem to fix, not a bug: one line (a server's log tail, if any, follows it)
        print(f"inventory-svc: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve" and args.worker is None and (
            workers := settings.workers or usable_cpus()) > 1:
        from inventory_svc.workers import supervise

        return asyncio.run(supervise(settings, workers, demo=args.demo))
    if args.command == "serve":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        if args.worker is not None:
            asyncio.run(_serve_worker(settings, args.worker, args.supervisor or os.getppid(),
                                      args.demo))
        else:
            asyncio.run(_serve(settings, args.demo))
    elif args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "demo-load":
        from inventory_svc.demo import load_demo

        asyncio.run(load_demo(args.target, seed=args.seed, sku_count=args.skus,
                              api_key=args.api_key, force=args.force))
    elif args.command == "watch":
        from inventory_svc.watch_cli import run_watch

        return asyncio.run(run_watch(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
