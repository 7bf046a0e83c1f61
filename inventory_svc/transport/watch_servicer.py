"""WatchService over grpc.aio: the request into a filter, stream items into messages, and the
status a stream ends with (docs/WATCH.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import watch_service_pb2 as wp
from inventory.v1 import watch_service_pb2_grpc as wp_grpc
from inventory_svc.app.watch import Item, WatchService, WatchStart
from inventory_svc.domain.errors import DomainError, FieldViolation, InvalidArgument
from inventory_svc.domain.model import Channel, StockLevel
from inventory_svc.domain.watch import (
    AlertKind,
    AlertScope,
    Delivery,
    DeliveryBatch,
    EventKind,
    Heartbeat,
    SnapshotPage,
    build_filter,
)
from inventory_svc.transport.admission import current_principal
from inventory_svc.transport.errors import to_status
from inventory_svc.transport.inventory_servicer import channel_of

log = logging.getLogger(__name__)
_CHANNELS = [(c, pb.Channel.Value(f"CHANNEL_{c.value}")) for c in Channel]
_CHANNEL_OUT = dict(_CHANNELS)
_KIND_OUT = {k: wp.StockEventKind.Value(f"STOCK_EVENT_KIND_{k.value}") for k in EventKind}
_KIND_IN = {v: k for k, v in _KIND_OUT.items()}
_ALERT_OUT = {k: wp.StockAlertKind.Value(f"STOCK_ALERT_KIND_{k.value}") for k in AlertKind}
_SCOPE_OUT = {s: wp.StockAlertScope.Value(f"STOCK_ALERT_SCOPE_{s.value}") for s in AlertScope}


def kinds_in(values: Any) -> list[EventKind]:
    out = []
    for i, v in enumerate(values):
        if v not in _KIND_IN:
            raise InvalidArgument([FieldViolation(f"kinds[{i}]", f"unknown event kind {v}")])
        out.append(_KIND_IN[v])
    return out


def state_out(level: StockLevel, active: bool) -> wp.StockState:
    return wp.StockState(
        sku=level.sku, location_id=level.location_id, on_hand=level.on_hand,
        reserved=level.reserved, safety_stock=level.safety_stock,
        available=[wp.ChannelAvailability(channel=v, available=level.available(c))
                   for c, v in _CHANNELS],
        version=level.version, change_seq=level.seq, location_active=active)


def event_out(d: Delivery, channel: Channel) -> wp.StockEvent:
    ev = d.event
    level = StockLevel(ev.sku, ev.location_id, ev.on_hand, ev.reserved, ev.safety_stock,
                       ev.version, ev.change_seq)
    before, after = ev.sku_available(channel) if d.sku_totals else (0, 0)
    return wp.StockEvent(
        sequence=ev.seq, kind=_KIND_OUT[ev.kind], state=state_out(level, ev.location_active),
        on_hand_delta=ev.on_hand_delta, reserved_delta=ev.reserved_delta,
        reservation_ids=ev.reservation_ids, order_refs=ev.order_refs,
        committed_at_unix_us=ev.committed_at_us, sequenced_at_unix_us=ev.sequenced_at_us,
        sku_available_before=before, sku_available_after=after,
        alerts=[wp.StockAlert(kind=_ALERT_OUT[a.kind], scope=_SCOPE_OUT[a.scope],
                              channel=_CHANNEL_OUT[a.channel], available_before=a.available_before,
                              available_after=a.available_after, threshold=a.threshold)
                for a in d.alerts])


def snapshot_out(page: SnapshotPage) -> wp.WatchStockResponse:
    return wp.WatchStockResponse(snapshot=wp.SnapshotPage(
        states=[state_out(r.level, r.location_active) for r in page.rows],
        sequence=page.sequence, done=page.done))


def item_out(item: Item, channel: Channel) -> wp.WatchStockResponse:
    if isinstance(item, Delivery):
        return wp.WatchStockResponse(event=event_out(item, channel))
    if isinstance(item, DeliveryBatch):
        return wp.WatchStockResponse(events=wp.StockEventBatch(
            events=[event_out(d, channel) for d in item.deliveries]))
    if isinstance(item, SnapshotPage):
        return snapshot_out(item)
    assert isinstance(item, Heartbeat)
    return wp.WatchStockResponse(heartbeat=wp.Heartbeat(
        sequence=item.sequence, head_sequence=item.head, server_time_unix_us=item.server_time_us))


class WatchServicer(wp_grpc.WatchServiceServicer):
    def __init__(self, watch: WatchService) -> None:
        self.watch = watch

    # a coroutine that writes, not an async generator: a stream cut off by the hub is cancelled
    # while it waits in write(), and only here can that become the status it ends with
    async def WatchStock(  # type: ignore[override]
            self, request: wp.WatchStockRequest, context: Any) -> None:
        settings = self.watch.ctx.settings
        try:
            channel = channel_of(request.channel)
            start_field = request.WhichOneof("start")
            after = request.after_sequence if start_field == "after_sequence" else None
            filt = build_filter(
                current_principal(), channel, skus=list(request.skus),
                location_ids=list(request.location_ids), location_prefix=request.location_prefix,
                kinds=kinds_in(request.kinds), low_stock=request.low_stock_threshold,
                location_alerts=request.location_alerts, alerts_only=request.alerts_only,
                after_sequence=after, max_skus=settings.max_skus_per_read,
                max_ids=settings.max_ids_per_read)
            stream = await self.watch.open(filt, WatchStart(
                after, start_field == "snapshot" and request.snapshot,
                request.heartbeat_ms / 1000, request.max_events_per_message))
        except DomainError as err:
            await context.abort_with_status(to_status(err))
            return
        try:
            async with contextlib.aclosing(stream.items()) as items:
                async for item in items:
                    await context.write(item_out(item, channel))
        except asyncio.CancelledError:
            # cancelled by the hub (the consumer stopped reading, or a shutdown): that is our
            # answer; cancelled by grpc (the client went away): nobody is listening
            if stream.cut_error is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await context.abort_with_status(to_status(stream.cut_error))
        except DomainError as err:
            await context.abort_with_status(to_status(err))
        except Exception:
            log.exception("WatchStock failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")

