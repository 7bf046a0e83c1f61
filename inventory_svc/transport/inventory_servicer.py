"""InventoryService over grpc.aio: decode, call the use case, encode; errors as rich status."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.app.group_settle import Settled
from inventory_svc.app.reservations import ReservationService
from inventory_svc.app.returns import ReturnResult
from inventory_svc.app.stock import (
    IMPORT_SLICE,
    ImportResult,
    StockChange,
    StockService,
    TransferResult,
)
from inventory_svc.domain.errors import (
    DeadlineExceeded,
    DomainError,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
)
from inventory_svc.domain.model import Channel, ImportRow, Location, Reservation, StockLevel
from inventory_svc.domain.returns import Disposition
from inventory_svc.domain.validation import Violations, check_idempotency_key
from inventory_svc.storage.pg_base import Idem, Replay
from inventory_svc.transport import convert as cv
from inventory_svc.transport.admission import answers_encoded, current_principal
from inventory_svc.transport.errors import to_status
from inventory_svc.transport.views import VIEWS_KEPT, Views

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Message)
A = TypeVar("A", bound=Message | bytes)  # an answer: a message, or one encoded already
T = TypeVar("T")


def idem_for(
    method: str, request: Message | bytes, key: str, encode: Callable[[Any], Message]
) -> Idem | None:
    """The call's idempotency context; None when the client sent no key. Keys belong to the
    principal: the same key sent by two principals is two keys."""
    v = Violations()
    check_idempotency_key(v, key)
    v.raise_if_any()
    if not key:
        return None
    owner = current_principal().name
    if owner:
        key = f"{owner}/{key}"  # principal names hold no "/"
    body = request if isinstance(request, bytes) else request.SerializeToString(deterministic=True)
    return Idem(key, method, Idem.fingerprint_of(method, body),
                lambda result: encode(result).SerializeToString())


async def guarded(context: grpc.aio.ServicerContext[Any, Any], call: Awaitable[A]) -> A:
    """Run a call; a DomainError becomes its DESIGN §4 status, anything else INTERNAL (logged).

    A call with a deadline is given up just before it with DEADLINE_EXCEEDED: its outcome is
    unknown (a reservation may have committed), so the client retries with the same idempotency
    key and gets the first answer. UNAVAILABLE stays "nothing was confirmed".
    """
    try:
        remaining = context.time_remaining()
        if remaining is None or remaining > 86_400:
            return await call
        try:
            async with asyncio.timeout(max(0.0, remaining - min(0.05, remaining / 10))):
                return await call
        except TimeoutError:
            raise DeadlineExceeded(
                "the call's deadline ran out before its outcome was known; retry it with the "
                "same idempotency_key to learn it") from None
    except DomainError as err:
        await context.abort_with_status(to_status(err))  # type: ignore[attr-defined]
    except Exception:
        log.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")
    raise AssertionError("unreachable: abort raises")


def channel_of(value: int, field: str = "channel", *, sell: bool = False) -> Channel:
    """The call's channel comes from its principal: the one it names if the principal may act
    for it (else PERMISSION_DENIED), the principal's own when it names none. A sale names none:
    POS where the principal may sell for POS."""
    who = current_principal()
    if value:
        return who.channel_for(cv.channel(value, field))
    if sell and Channel.POS in who.channels:
        return Channel.POS
    return who.channel_for(None)


def built_once(encode: Callable[[T], R]) -> Callable[[T], R]:
    """`encode` that builds the response of one result once: a call with a key encodes its
    result for its idempotency record (idem_for), then again as the response it sends."""
    last: list[tuple[T, R]] = []

    def once(result: T) -> R:
        if not last or last[0][0] is not result:
            last[:] = [(result, encode(result))]
        return last[0][1]
    return once


def _replayed(result: object, response_type: type[R], encode: Callable[[Any], R]) -> R:
    if isinstance(result, Replay):
        return response_type.FromString(result.payload)
    return encode(result)


class InventoryServicer(api_grpc.InventoryServiceServicer):
    def __init__(self, stock: StockService, reservations: ReservationService) -> None:
        self.stock = stock
        self.res = reservations
        # each SKU's last GetAvailability answer per channel and scope, while its fields are
        # the same, encoded: bytes, which the garbage collector does not walk
        self._availability: Views[bytes] = Views(VIEWS_KEPT)

    async def UpsertLocations(self, request: api.UpsertLocationsRequest, context: Any) -> api.UpsertLocationsResponse:  # noqa: E501
        @built_once
        def encode(locs: list[Location]) -> api.UpsertLocationsResponse:
            return api.UpsertLocationsResponse(locations=[cv.location_out(x) for x in locs])

        async def run() -> api.UpsertLocationsResponse:
            locs = [cv.location_in(m, i) for i, m in enumerate(request.locations)]
            idem = idem_for("UpsertLocations", request, request.idempotency_key, encode)
            return _replayed(await self.stock.upsert_locations(locs, idem),
                             api.UpsertLocationsResponse, encode)
        return await guarded(context, run())

    async def ListLocations(self, request: api.ListLocationsRequest, context: Any) -> api.ListLocationsResponse:  # noqa: E501
        async def run() -> api.ListLocationsResponse:
            kind = cv.location_type(request.type, "type")
            locs = await self.stock.list_locations(list(request.ids), kind, request.include_inactive)
            return api.ListLocationsResponse(locations=[cv.location_out(x) for x in locs])
        return await guarded(context, run())

    async def SetStock(self, request: api.SetStockRequest, context: Any) -> api.SetStockResponse:
        async def run() -> api.SetStockResponse:
            ch = channel_of(request.channel)

            @built_once
            def encode(r: tuple[StockLevel, int]) -> api.SetStockResponse:
                return api.SetStockResponse(stock=cv.level_out(r[0], ch), delta=r[1])

            expected = request.expected_version if request.HasField("expected_version") else None
            idem = idem_for("SetStock", request, request.idempotency_key, encode)
            out = await self.stock.set_stock(request.sku, request.location_id, request.on_hand,
                                             expected, request.reason, idem)
            return _replayed(out, api.SetStockResponse, encode)
        return await guarded(context, run())

    async def AdjustStock(self, request: api.AdjustStockRequest, context: Any) -> api.AdjustStockResponse:
        async def run() -> api.AdjustStockResponse:
            ch = channel_of(request.channel)

            @built_once
            def encode(r: StockChange) -> api.AdjustStockResponse:
                return api.AdjustStockResponse(stock=cv.level_out(r.level, ch),
                                               movement=cv.movement_out(r.movements[0]))

            kind, label = cv.adjustment_kind(request.reason)
            reason = f"{label}: {request.note}" if request.note else label
            idem = idem_for("AdjustStock", request, request.idempotency_key, encode)
            out = await self.stock.adjust_stock(request.sku, request.location_id, request.delta,
                                                kind, reason, idem)
            return _replayed(out, api.AdjustStockResponse, encode)
        return await guarded(context, run())

    async def ImportStock(self, request_iterator: AsyncIterator[api.ImportStockRequest], context: Any) -> api.ImportStockResponse:  # noqa: E501
        @built_once
        def encode(r: ImportResult) -> api.ImportStockResponse:
            return api.ImportStockResponse(rows_received=r.rows_received,
                                           rows_changed=r.rows_changed, skus=r.skus)

        async def run() -> api.ImportStockResponse:
            # Counted as the stream arrives: a load over its caps is refused when it crosses
            # them, not after it has been buffered.
            limits = self.stock.ctx.settings
            rows: list[ImportRow] = []
            key = reason = ""
            digest = hashlib.sha256()
            size = 0
            first = True
            async for msg in request_iterator:
                if first:
                    key, reason, first = msg.idempotency_key, msg.reason, False
                body = msg.SerializeToString(deterministic=True)
                size += len(body)
                if size > limits.import_max_bytes:
                    raise ResourceExhausted(
                        f"ImportStock: more than {limits.import_max_bytes} bytes; split the load",
                        subject="import_max_bytes")
                if len(rows) + len(msg.rows) > limits.import_max_rows:
                    raise ResourceExhausted(
                        f"ImportStock: more than {limits.import_max_rows} rows; split the load",
                        subject="import_max_rows")
                digest.update(body)
                for r in msg.rows:
                    rows.append(ImportRow(len(rows), r.sku, r.location_id, r.on_hand,
                                          r.safety_stock if r.HasField("safety_stock") else None))
                    if len(rows) % IMPORT_SLICE == 0:  # a large message: other calls go between
                        await asyncio.sleep(0)
            idem = idem_for("ImportStock", digest.digest(), key, encode)
            return _replayed(await self.stock.import_stock(rows, reason, idem),
                             api.ImportStockResponse, encode)

        async def bounded() -> api.ImportStockResponse:
            timeout_s = self.stock.ctx.settings.import_timeout_s
            try:
                async with asyncio.timeout(timeout_s):
                    return await run()
            except TimeoutError:
                raise ResourceExhausted(
                    f"ImportStock: the load took longer than {timeout_s:g} s; split it",
                    subject="import_timeout_s") from None
        return await guarded(context, bounded())

    async def TransferStock(self, request: api.TransferStockRequest, context: Any) -> api.TransferStockResponse:  # noqa: E501
        async def run() -> api.TransferStockResponse:
            ch = channel_of(request.channel)

            @built_once
            def encode(r: TransferResult) -> api.TransferStockResponse:
                return api.TransferStockResponse(
                    from_stock=cv.level_out(r.source, ch), to_stock=cv.level_out(r.destination, ch),
                    movements=[cv.movement_out(m) for m in r.movements])

            idem = idem_for("TransferStock", request, request.idempotency_key, encode)
            out = await self.stock.transfer_stock(request.sku, request.from_location_id,
                                                  request.to_location_id, request.quantity,
                                                  request.reason, idem)
            return _replayed(out, api.TransferStockResponse, encode)
        return await guarded(context, run())

    async def SetSafetyStock(self, request: api.SetSafetyStockRequest, context: Any) -> api.SetSafetyStockResponse:  # noqa: E501
        async def run() -> api.SetSafetyStockResponse:
            ch = channel_of(request.channel)

            @built_once
            def encode(r: StockLevel) -> api.SetSafetyStockResponse:
                return api.SetSafetyStockResponse(stock=cv.level_out(r, ch))

            safety = request.safety_stock if request.HasField("safety_stock") else None
            idem = idem_for("SetSafetyStock", request, request.idempotency_key, encode)
            out = await self.stock.set_safety_stock(request.sku, request.location_id, safety, idem)
            return _replayed(out, api.SetSafetyStockResponse, encode)
        return await guarded(context, run())

    @answers_encoded
    async def GetAvailability(  # type: ignore[override]  # its answer is encoded here
            self, request: api.GetAvailabilityRequest, context: Any) -> bytes:
        """The response encoded here: each item is kept encoded as a response of its own, and
        encoded messages concatenated are one message whose repeated fields hold all their
        elements, so a kept item is neither copied nor encoded again."""
        async def run() -> bytes:
            ch = channel_of(request.channel)
            items = await self.stock.get_availability(list(request.skus), list(request.location_ids))
            out: list[bytes] = []
            for item in items:
                key = (item.sku, ch, item.scope)
                encoded = self._availability.get(key, item.source)
                if encoded is None:
                    encoded = api.GetAvailabilityResponse(
                        items=[cv.availability_out(item.sku, item.levels, ch)]).SerializeToString()
                    self._availability.put(key, item.source, encoded)
                out.append(encoded)
            return b"".join(out)
        return await guarded(context, run())

    async def FindNearby(self, request: api.FindNearbyRequest, context: Any) -> api.FindNearbyResponse:
        async def run() -> api.FindNearbyResponse:
            ch = channel_of(request.channel)
            found = await self.stock.find_nearby(
                cv.items_in(list(request.items)), request.lat, request.lon, request.radius_km, ch,
                request.limit, request.pickup_only)
            return api.FindNearbyResponse(locations=[api.NearbyLocation(
                location=cv.location_out(n.location), distance_km=n.distance_km,
                stock=[cv.level_out(lv, ch) for lv in n.levels]) for n in found])
        return await guarded(context, run())

    async def Reserve(self, request: api.ReserveRequest, context: Any) -> api.ReserveResponse:
        @built_once
        def encode(r: Reservation) -> api.ReserveResponse:
            return api.ReserveResponse(reservation=cv.reservation_out(r))

        async def run() -> api.ReserveResponse:
            ch = channel_of(request.channel)
            idem = idem_for("Reserve", request, request.idempotency_key, encode)
            out = await self.res.reserve(cv.lines_in(list(request.lines)), request.ttl_seconds, ch,
                                         request.order_ref, idem, principal=current_principal())
            return _replayed(out, api.ReserveResponse, encode)
        return await guarded(context, run())

    async def GetReservation(self, request: api.GetReservationRequest, context: Any) -> api.GetReservationResponse:  # noqa: E501
        async def run() -> api.GetReservationResponse:
            res = await self.res.get(request.reservation_id, principal=current_principal())
            return api.GetReservationResponse(reservation=cv.reservation_out(res))
        return await guarded(context, run())

    async def ExtendReservation(self, request: api.ExtendReservationRequest, context: Any) -> api.ExtendReservationResponse:  # noqa: E501
        @built_once
        def encode(r: Reservation) -> api.ExtendReservationResponse:
            return api.ExtendReservationResponse(reservation=cv.reservation_out(r))

        async def run() -> api.ExtendReservationResponse:
            idem = idem_for("ExtendReservation", request, request.idempotency_key, encode)
            out = await self.res.extend(request.reservation_id, request.ttl_seconds, idem,
                                        principal=current_principal())
            return _replayed(out, api.ExtendReservationResponse, encode)
        return await guarded(context, run())

    async def ReleaseReservation(self, request: api.ReleaseReservationRequest, context: Any) -> api.ReleaseReservationResponse:  # noqa: E501
        @built_once
        def encode(r: Reservation) -> api.ReleaseReservationResponse:
            return api.ReleaseReservationResponse(reservation=cv.reservation_out(r))

        async def run() -> api.ReleaseReservationResponse:
            idem = idem_for("ReleaseReservation", request, request.idempotency_key, encode)
            out = await self.res.release(request.reservation_id, cv.lines_in(list(request.lines)),
                                         idem, principal=current_principal())
            return _replayed(out, api.ReleaseReservationResponse, encode)
        return await guarded(context, run())

    async def CommitReservation(self, request: api.CommitReservationRequest, context: Any) -> api.CommitReservationResponse:  # noqa: E501
        @built_once
        def encode(r: Settled) -> api.CommitReservationResponse:
            return api.CommitReservationResponse(
                reservation=cv.reservation_out(r.reservation),
                movements=[cv.movement_out(m) for m in r.movements])

        async def run() -> api.CommitReservationResponse:
            idem = idem_for("CommitReservation", request, request.idempotency_key, encode)
            out = await self.res.commit(request.reservation_id, idem,
                                        principal=current_principal())
            return _replayed(out, api.CommitReservationResponse, encode)
        return await guarded(context, run())

    async def Sell(self, request: api.SellRequest, context: Any) -> api.SellResponse:
        @built_once
        def encode(r: Settled) -> api.SellResponse:
            return api.SellResponse(reservation=cv.reservation_out(r.reservation),
                                    movements=[cv.movement_out(m) for m in r.movements])

        async def run() -> api.SellResponse:
            ch = channel_of(request.channel, sell=True)
            idem = idem_for("Sell", request, request.idempotency_key, encode)
            out = await self.res.sell(request.location_id, cv.items_in(list(request.items)), ch,
                                      request.order_ref, idem, principal=current_principal())
            return _replayed(out, api.SellResponse, encode)
        return await guarded(context, run())

    async def ReturnItems(self, request: api.ReturnItemsRequest, context: Any) -> api.ReturnItemsResponse:
        async def run() -> api.ReturnItemsResponse:
            ch = channel_of(request.channel)
            if request.disposition == api.RETURN_DISPOSITION_UNSPECIFIED:
                disposition = Disposition.SELLABLE
            elif request.disposition in api.ReturnDisposition.values():
                disposition = Disposition(api.ReturnDisposition.Name(
                    request.disposition).removeprefix("RETURN_DISPOSITION_"))
            else:
                raise InvalidArgument([FieldViolation(
                    "disposition", f"unknown disposition {request.disposition}")])

            @built_once
            def encode(r: ReturnResult) -> api.ReturnItemsResponse:
                return api.ReturnItemsResponse(
                    movements=[cv.movement_out(m) for m in r.movements],
                    stock=[cv.level_out(lv, ch) for lv in r.levels],
                    return_id=r.return_id,
                    lines=[api.ReturnItemsResponse.Line(sku=x.sku, quantity=x.quantity,
                                                        sold=x.sold, returnable=x.returnable)
                           for x in r.lines],
                    disposition=api.ReturnDisposition.Value(
                        f"RETURN_DISPOSITION_{r.disposition.value}"),
                    reservation_id=r.sale.reservation_id, order_ref=r.sale.order_ref)

            idem = idem_for("ReturnItems", request, request.idempotency_key, encode)
            out = await self.stock.returns.return_items(
                request.location_id, cv.items_in(list(request.items)),
                reservation_id=request.reservation_id, order_ref=request.order_ref,
                unmatched=request.unmatched, disposition=disposition, reason=request.reason,
                idem=idem, principal=current_principal())
            return _replayed(out, api.ReturnItemsResponse, encode)
        return await guarded(context, run())

    async def ListMovements(self, request: api.ListMovementsRequest, context: Any) -> api.ListMovementsResponse:  # noqa: E501
        async def run() -> api.ListMovementsResponse:
            rows, token = await self.stock.list_movements(
                request.sku, request.location_id, request.order_ref, request.reservation_id,
                request.page_size, request.page_token)
            return api.ListMovementsResponse(movements=[cv.movement_out(m) for m in rows],
                                             next_page_token=token)
        return await guarded(context, run())
