"""`inventory-svc watch`: follow WatchStock and print each event as a line (JSON with --json),
resuming after the last sequence seen when the stream breaks (docs/WATCH.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from inventory.v1 import common_pb2 as pb
from inventory.v1 import watch_service_pb2 as wp
from inventory.v1 import watch_service_pb2_grpc as wp_grpc

KINDS = [n.removeprefix("STOCK_EVENT_KIND_") for n, _ in wp.StockEventKind.items()][1:]
CHANNELS = [n.removeprefix("CHANNEL_") for n, _ in pb.Channel.items()][1:]
# the stream ended, but another try (on any replica) goes on where it stopped
RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.DEADLINE_EXCEEDED}


def add_parser(sub: Any) -> None:
    w = sub.add_parser(
        "watch", help="print the stock event stream (WatchStock) as lines",
        description="Follow WatchStock on a running service and print one line per event "
                    "(sequence, cause, SKU@location, levels, who did it, lag). The stream is "
                    "resumed after the last sequence printed when it breaks.")
    w.add_argument("--target", default="127.0.0.1:50051", help="service address host:port")
    w.add_argument("--api-key", default=os.environ.get("INVENTORY_API_KEY", ""),
                   help="the key to call with, if the service has principals "
                        "(default: INVENTORY_API_KEY)")
    w.add_argument("--sku", action="append", default=[], help="only this SKU (repeatable)")
    w.add_argument("--location", action="append", default=[],
                   help="only this location (repeatable)")
    w.add_argument("--location-prefix", default="", help="only locations whose id starts so")
    w.add_argument("--kind", action="append", default=[], choices=KINDS,
                   help="only events of this cause (repeatable)")
    w.add_argument("--channel", choices=CHANNELS, help="availability and alerts for this channel")
    w.add_argument("--from", dest="after", type=int, metavar="SEQ",
                   help="resume after sequence SEQ (the last one seen); default: from now on")
    w.add_argument("--snapshot", action="store_true",
                   help="print the current stock first, then the events after it")
    w.add_argument("--low-stock", type=int, default=0, metavar="N",
                   help="LOW_STOCK alerts when available drops below N")
    w.add_argument("--alerts-only", action="store_true", help="only events that raise alerts")
    w.add_argument("--heartbeats", action="store_true", help="print heartbeats too")
    w.add_argument("--json", action="store_true", help="one JSON object per line")
    w.add_argument("--count", type=int, default=0, help="exit after this many events")
    w.add_argument("--per-message", type=int, default=0, metavar="N",
                   help="ask for up to N events a message (2-1000): faster behind a bulk change;"
                        " still one line per event")


def _channel_name(value: int) -> str:
    return pb.Channel.Name(pb.Channel.ValueType(value)).removeprefix("CHANNEL_")


def describe(msg: wp.WatchStockResponse, channel: int) -> str:
    """The line `watch` prints for a message (without --json)."""
    item = msg.WhichOneof("item")
    if item == "heartbeat":
        return f"heartbeat seq={msg.heartbeat.sequence} head={msg.heartbeat.head_sequence}"
    if item == "snapshot":
        lines = [f"snapshot {s.sku}@{s.location_id} on_hand={s.on_hand} reserved={s.reserved}"
                 f" available={_available(s, channel)} change_seq={s.change_seq}"
                 for s in msg.snapshot.states]
        if msg.snapshot.done:
            lines.append(f"snapshot done: events follow after seq={msg.snapshot.sequence}")
        return "\n".join(lines)
    e = msg.event
    s = e.state
    lag_ms = (time.time() * 1e6 - e.committed_at_unix_us) / 1000
    text = (f"seq={e.sequence} {wp.StockEventKind.Name(e.kind).removeprefix('STOCK_EVENT_KIND_')}"
            f" {s.sku}@{s.location_id} on_hand={s.on_hand} ({e.on_hand_delta:+d})"
            f" reserved={s.reserved} ({e.reserved_delta:+d}) available={_available(s, channel)}")
    if e.reservation_ids:
        text += f" reservations={','.join(e.reservation_ids)}"
    if e.order_refs:
        text += f" orders={','.join(e.order_refs)}"
    for a in e.alerts:
        text += (f" ALERT {wp.StockAlertKind.Name(a.kind).removeprefix('STOCK_ALERT_KIND_')}"
                 f" {wp.StockAlertScope.Name(a.scope).removeprefix('STOCK_ALERT_SCOPE_')}"
                 f" {_channel_name(a.channel)} {a.available_before}->{a.available_after}")
    return text + f" lag={lag_ms:.1f}ms"


def _available(s: wp.StockState, channel: int) -> int:
    want = channel or pb.CHANNEL_WEB
    return next((a.available for a in s.available if a.channel == want), 0)


async def run_watch(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    channel = (pb.Channel.Value(f"CHANNEL_{args.channel}") if args.channel
               else pb.CHANNEL_UNSPECIFIED)
    request = wp.WatchStockRequest(
        skus=args.sku, location_ids=args.location, location_prefix=args.location_prefix,
        channel=channel, kinds=[wp.StockEventKind.Value(f"STOCK_EVENT_KIND_{k}")
                                for k in args.kind],
        low_stock_threshold=args.low_stock, alerts_only=args.alerts_only,
        max_events_per_message=max(0, args.per_message))
    if args.after is not None:
        request.after_sequence = args.after
    elif args.snapshot:
        request.snapshot = True
    metadata = (("x-api-key", args.api_key),) if args.api_key else ()
    printed = 0
    pause = 0.2
    async with grpc.aio.insecure_channel(args.target) as ch:
        stub = wp_grpc.WatchServiceStub(ch)
        while True:
            try:
                async for got in stub.WatchStock(request, metadata=metadata):
                    pause = 0.2
                    # several events a message (--per-message): still a line each
                    for msg in ([wp.WatchStockResponse(event=e) for e in got.events.events]
                                if got.WhichOneof("item") == "events" else [got]):
                        kind = msg.WhichOneof("item")
                        if kind == "heartbeat":
                            request.after_sequence = msg.heartbeat.sequence
                            if not args.heartbeats:
                                continue
                        elif kind == "snapshot" and msg.snapshot.done:
                            request.after_sequence = msg.snapshot.sequence
                        elif kind == "event":
                            request.after_sequence = msg.event.sequence
                        out.write((json.dumps(json_format.MessageToDict(msg)) if args.json
                                   else describe(msg, channel)) + "\n")
                        if kind == "event":
                            printed += 1
                            if args.count and printed >= args.count:
                                out.flush()
                                return 0
                    out.flush()
            except grpc.aio.AioRpcError as err:
                if err.code() not in RESUMABLE:
                    print(f"inventory-svc watch: {err.code().name}: {err.details()}",
                          file=sys.stderr)
                    return 1
                # a snapshot cut short starts again (its rows come with change_seq)
                where = ("again" if request.WhichOneof("start") == "snapshot"
                         else f"after seq={request.after_sequence}")
                print(f"inventory-svc watch: {err.code().name}: {err.details()}; resuming"
                      f" {where}", file=sys.stderr, flush=True)
                await asyncio.sleep(pause)
                pause = min(5.0, pause * 2)
