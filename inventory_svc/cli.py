"""The `inventory-svc` command: serve, migrate, demo-load."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from inventory_svc.config import ConfigError, Settings
from inventory_svc.redact import RedactingFilter, redact

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
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if settings.log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())  # no store password in any log line
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inventory-svc", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="run the gRPC service (embedded stores unless URLs are set)",
                       description="Run the gRPC service until SIGTERM or Ctrl-C.")
    s.add_argument("--port", type=int, help="gRPC port (default: INVENTORY_PORT or 50051)")
    s.add_argument("--host", help="bind address (default: INVENTORY_HOST or 127.0.0.1)")
    s.add_argument("--data-dir", type=Path,
                   help="where embedded Redis/Postgres keep their data (default: .data)")
    s.add_argument("--demo", action="store_true",
                   help="load the demo network (Polish cities, 10k SKUs) if no locations exist")
    m = sub.add_parser("migrate", help="apply database migrations and exit",
                       description="Apply pending Postgres migrations (safe to run concurrently).")
    m.add_argument("--data-dir", type=Path, help="embedded Postgres data dir when no URL is set")
    d = sub.add_parser("demo-load", help="load the demo network into a running service",
                       description="Upsert the demo locations and import their stock over gRPC.")
    d.add_argument("--target", default="127.0.0.1:50051", help="service address host:port")
    d.add_argument("--skus", type=int, default=10_000, help="number of demo SKUs")
    d.add_argument("--seed", type=int, default=7, help="random seed of the demo network")
    d.add_argument("--api-key", default=os.environ.get("INVENTORY_DEMO_API_KEY", ""),
                   help="an erp/admin key when the service has principals "
                        "(default: INVENTORY_DEMO_API_KEY)")
    return p


async def _serve(settings: Settings, demo: bool) -> None:
    import signal

    from inventory_svc.demo import load_demo
    from inventory_svc.server import embedded_stores, serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with embedded_stores(settings) as resolved, serve(resolved) as running:
        if demo and not running.ctx.locations:
            if resolved.tls_cert or resolved.api_keys or resolved.principals_file:
                print("inventory-svc: --demo loads only into an open plaintext service; use "
                      "`inventory-svc demo-load --api-key ...`", file=sys.stderr, flush=True)
            else:
                await load_demo(f"127.0.0.1:{running.port}", sku_count=settings.demo_skus)
                await running.ctx.refresh_locations()
        print(f"inventory-svc serving gRPC on {resolved.host}:{running.port} "
              f"({len(running.ctx.locations)} locations); Ctrl-C to stop", flush=True)
        await stop.wait()
        print("inventory-svc: shutting down", flush=True)


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
        overrides = {k: getattr(args, k, None) for k in ("port", "host", "data_dir")}
        settings = Settings.from_env(**overrides)
    except ConfigError as exc:
        print(f"inventory-svc: configuration error: {redact(str(exc))}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    try:
        if args.command == "serve":
            try:
                import uvloop

                uvloop.install()
            except ImportError:
                pass
            asyncio.run(_serve(settings, args.demo))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        else:
            from inventory_svc.demo import load_demo

            asyncio.run(load_demo(args.target, seed=args.seed, sku_count=args.skus,
                                  api_key=args.api_key))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
