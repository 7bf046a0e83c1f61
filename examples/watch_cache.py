"""A local availability cache kept in sync with inventory-svc by WatchStock (docs/WATCH.md).

What a storefront cache or a marketplace feed does: take a snapshot once, then apply every
event after it; on a break, resume after the last sequence seen (on any replica); when that is
past retention (CURSOR_EXPIRED), take a snapshot again. Two rules make it exact:

- keep, per SKU-location, the row with the larger `change_seq` (a snapshot page and an event
  may both carry the same change: the larger one is the newer);
- remember the last `sequence` of an event, a heartbeat or a finished snapshot, and resume
  after it: every event after it comes, none before it is needed.

    inventory-svc serve --demo &
    python examples/watch_cache.py --target 127.0.0.1:50051 --sku SKU-000001 --sku SKU-000002
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2 as rpc
from grpc_status import rpc_status

from inventory.v1 import common_pb2 as pb
from inventory.v1 import watch_service_pb2 as wp
from inventory.v1 import watch_service_pb2_grpc as wp_grpc

# the stream broke but may go on where it stopped (another replica, a moment later)
RESUME = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
          grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class Row:
    on_hand: int
    reserved: int
    available: int  # for the cache's channel
    change_seq: int


@dataclass
class AvailabilityCache:
    channel: int = pb.CHANNEL_WEB
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    last_sequence: int | None = None  # None: no snapshot yet
    on_change: Callable[[str, str, Row], None] | None = None

    def apply(self, msg: wp.WatchStockResponse) -> None:
        item = msg.WhichOneof("item")
        if item == "snapshot":
            for state in msg.snapshot.states:
                self._put(state)
            if msg.snapshot.done:
                self.last_sequence = msg.snapshot.sequence
        elif item == "events":  # several a message: what `follow` asks for
            for event in msg.events.events:
                self._put(event.state)
            self.last_sequence = msg.events.events[-1].sequence
        elif item == "event":
            self._put(msg.event.state)
            self.last_sequence = msg.event.sequence
        else:  # a heartbeat: nothing this cache wants up to here
            self.last_sequence = max(self.last_sequence or 0, msg.heartbeat.sequence)

    def _put(self, s: wp.StockState) -> None:
        key = (s.sku, s.location_id)
        held = self.rows.get(key)
        if held is not None and held.change_seq >= s.change_seq:
            return  # the cache has this change already (or a newer one)
        available = next(a.available for a in s.available if a.channel == self.channel)
        self.rows[key] = row = Row(s.on_hand, s.reserved, available, s.change_seq)
        if self.on_change is not None:
            self.on_change(s.sku, s.location_id, row)


def cursor_expired(err: grpc.aio.AioRpcError) -> bool:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for d in status.details if status else ():
        if d.Is(rpc.PreconditionFailure.DESCRIPTOR):
            failure = rpc.PreconditionFailure()
            d.Unpack(failure)
            if any(v.type in ("CURSOR_EXPIRED", "CURSOR_AHEAD") for v in failure.violations):
                return True
    return False


async def follow(target: str, cache: AvailabilityCache, *, skus: Sequence[str] = (),
                 locations: Sequence[str] = (), api_key: str = "") -> None:
    """Keep `cache` in sync until cancelled."""
    metadata = (("x-api-key", api_key),) if api_key else ()
    pause = 0.1
    async with grpc.aio.insecure_channel(target) as ch:
        stub = wp_grpc.WatchServiceStub(ch)
        while True:
            # several events a message: a cache of a whole catalogue follows a bulk import
            # (an event a row) four to five times faster than one a message
            request = wp.WatchStockRequest(skus=skus, location_ids=locations,
                                           channel=cache.channel, max_events_per_message=100)
            if cache.last_sequence is None:
                request.snapshot = True
            else:
                request.after_sequence = cache.last_sequence
            try:
                async for msg in stub.WatchStock(request, metadata=metadata):
                    cache.apply(msg)
                    pause = 0.1
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION and cursor_expired(err):
                    cache.last_sequence = None  # too far behind: a snapshot again
                elif err.code() not in RESUME:
                    raise
            await asyncio.sleep(pause)
            pause = min(5.0, pause * 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--sku", action="append", default=[])
    p.add_argument("--location", action="append", default=[])
    p.add_argument("--api-key", default="")
    args = p.parse_args()

    def show(sku: str, loc: str, row: Row) -> None:
        print(f"{sku}@{loc}: on_hand={row.on_hand} reserved={row.reserved}"
              f" available={row.available}", flush=True)

    cache = AvailabilityCache(on_change=show)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(follow(args.target, cache, skus=args.sku, locations=args.location,
                           api_key=args.api_key))


if __name__ == "__main__":
    main()
