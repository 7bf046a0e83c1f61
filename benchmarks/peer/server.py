"""The peer over grpc.aio: `inventory.v1.InventoryService`, the methods the harness uses.

Requests arrive and answers leave as bytes (no (de)serializer on the handlers): Peer parses
what it needs and builds each answer once. Refusals carry the same rich status as our
service's (inventory_svc.transport.errors), so the load generator counts them alike; methods the
peer lacks answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc

from benchmarks.peer.service import Peer
from inventory_svc.domain.errors import Aborted, DomainError, Unavailable
from inventory_svc.transport.errors import to_status

log = logging.getLogger(__name__)
SERVICE = "inventory.v1.InventoryService"
_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
_RETRY_ERRORS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError,
                 asyncpg.CheckViolationError)


async def _abort(context: Any, err: DomainError) -> None:
    await context.abort_with_status(to_status(err))


async def _guarded(call: Awaitable[bytes], context: Any) -> bytes:
    """The answer, or the call's refusal as a rich status (INTERNAL for a bug, logged)."""
    try:
        return await call
    except DomainError as err:
        await _abort(context, err)
    except _RETRY_ERRORS as exc:
        await _abort(context, Aborted(f"concurrent conflict, retry the call: {exc}"))
    except _CONNECTION_ERRORS as exc:
        await _abort(context, Unavailable(f"postgres unavailable: {exc!r}"))
    except Exception:
        log.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the peer's log")
    raise AssertionError("unreachable: abort raises")


def _unary(fn: Callable[[bytes], Awaitable[bytes]]) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def handle(raw: bytes, context: Any) -> bytes:
        return await _guarded(fn(raw), context)
    return grpc.unary_unary_rpc_method_handler(handle)


def handlers(peer: Peer) -> grpc.GenericRpcHandler[bytes, bytes]:
    async def import_stock(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return await _guarded(peer.import_stock([m async for m in requests]), context)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Reserve": _unary(peer.reserve),
        "CommitReservation": _unary(peer.commit),
        "ReleaseReservation": _unary(peer.release),
        "GetReservation": _unary(peer.get_reservation),
        "GetAvailability": _unary(peer.get_availability),
        "UpsertLocations": _unary(peer.upsert_locations),
        "ListLocations": _unary(peer.list_locations),
        "SetStock": _unary(peer.set_stock),
        "ImportStock": grpc.stream_unary_rpc_method_handler(import_stock),
    })


async def prepare_database(database_url: str) -> None:
    """Our migrations on the peer's database, so it has exactly our tables; then the one piece
    of them that only serves Redis goes: the trigger numbering every stock update (stock_seq,
    how Redis orders committed values). The peer has no Redis, and a Postgres-only design
    would not pay a trigger call and a sequence step on every reservation."""
    from inventory_svc.storage.pg_base import PgBase

    db = await PgBase.connect(database_url, min_size=1, max_size=1, timeout_s=120)
    try:
        await db.migrate()
        await db.pool.execute("DROP TRIGGER IF EXISTS stock_next_seq ON stock")
    finally:
        await db.close()


@dataclass
class Running:
    port: int
    peer: Peer


@contextlib.asynccontextmanager
async def serve(database_url: str, *, port: int = 0, host: str = "127.0.0.1", pool_size: int = 16,
                outbox: bool = False, migrate: bool = True, sweep_interval_s: float = 1.0,
                reuseport: bool = False) -> AsyncIterator[Running]:
    """Run the peer until the block exits (sweep_interval_s 0: no sweeper)."""
    if migrate:
        await prepare_database(database_url)
    peer = Peer(database_url, pool_size=pool_size, outbox=outbox)
    await peer.start()
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1 if reuseport else 0),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_concurrent_streams", 1_000)])
    server.add_generic_rpc_handlers((handlers(peer),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    sweeper = asyncio.create_task(peer.sweep_forever(sweep_interval_s)) \
        if sweep_interval_s > 0 else None
    try:
        yield Running(bound, peer)
    finally:
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await server.stop(2.0)
        await peer.close()
