"""RoutingService over grpc.aio: proto order ↔ routing.model, plans out with their breakdown."""

from __future__ import annotations

from typing import Any

from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.app.routing import RoutedReservation, RoutingService
from inventory_svc.domain.errors import FieldViolation, InvalidArgument
from inventory_svc.domain.model import Channel
from inventory_svc.domain.validation import Violations
from inventory_svc.transport import convert as cv
from inventory_svc.transport.admission import current_principal
from inventory_svc.transport.inventory_servicer import (
    _replayed,
    built_once,
    channel_of,
    guarded,
    idem_for,
)
from routing import model as rm

_POLICIES = {
    rp.ROUTING_POLICY_UNSPECIFIED: rm.Policy.OPTIMAL,
    rp.ROUTING_POLICY_OPTIMAL: rm.Policy.OPTIMAL,
    rp.ROUTING_POLICY_PRIORITY: rm.Policy.PRIORITY,
    rp.ROUTING_POLICY_CLOSEST: rm.Policy.CLOSEST,
    rp.ROUTING_POLICY_HIGHEST_STOCK: rm.Policy.HIGHEST_STOCK,
    rp.ROUTING_POLICY_FEWEST_SPLITS: rm.Policy.FEWEST_SPLITS,
}

# (looked up once: an answer may exclude hundreds of locations)
_REASONS = {r: rp.ExclusionReason.Value("EXCLUSION_REASON_" + r.name) for r in rm.ExclusionReason}


def order_in(msg: rp.RoutingOrder, default_penalty: float) -> tuple[rm.Order, Channel]:
    pickup = msg.method == rp.FULFILMENT_METHOD_PICKUP
    if msg.method not in (rp.FULFILMENT_METHOD_UNSPECIFIED, rp.FULFILMENT_METHOD_SHIP,
                          rp.FULFILMENT_METHOD_PICKUP):
        raise InvalidArgument([FieldViolation("order.method", f"unknown method {msg.method}")])
    if not pickup:
        missing = [FieldViolation(f"order.{f}", "a SHIP order needs its destination")
                   for f in ("dest_lat", "dest_lon") if not msg.HasField(f)]
        if missing:
            raise InvalidArgument(missing)
    if msg.policy not in _POLICIES:
        raise InvalidArgument([FieldViolation("order.policy", f"unknown policy {msg.policy}")])
    if pickup:  # the rule every location id follows, before the solver's own looser check
        v = Violations()
        v.location_id("order.pickup_location_id", msg.pickup_location_id)
        v.raise_if_any()
    try:
        order = rm.Order(
            lines=tuple(rm.OrderLine(x.sku, x.quantity) for x in msg.lines),
            method=rm.Method.PICKUP if pickup else rm.Method.SHIP,
            dest_lat=None if pickup else msg.dest_lat,
            dest_lon=None if pickup else msg.dest_lon,
            pickup_location_id=msg.pickup_location_id if pickup else None,
            max_shipments=msg.max_shipments or 3,
            split_lines=msg.split_lines if msg.HasField("split_lines") else True,
            split_penalty=msg.split_penalty if msg.HasField("split_penalty") else default_penalty,
            max_distance_km=msg.max_distance_km if msg.HasField("max_distance_km") else None,
            policy=_POLICIES[msg.policy],
            excluded=frozenset(msg.excluded_location_ids),
            top_k=msg.alternatives or 3,
        )
    except rm.RoutingInputError as exc:
        # the field is named once, by the violation (str(exc) names it again)
        raise InvalidArgument([FieldViolation(f"order.{exc.field}", exc.message)]) from exc
    if not pickup and msg.pickup_location_id:
        raise InvalidArgument([FieldViolation(
            "order.pickup_location_id", "only for FULFILMENT_METHOD_PICKUP orders")])
    return order, channel_of(msg.channel, "order.channel")


def plan_out(order: rm.Order, plan: rm.Plan) -> rp.RoutingPlan:
    return rp.RoutingPlan(
        shipments=[rp.Shipment(
            location_id=a.location_id, ship_cost=a.ship_cost, unit_cost=a.unit_cost,
            distance_km=a.distance_km,
            lines=[rp.ShipmentLine(sku=order.lines[j].sku, quantity=u)
                   for j, u in enumerate(a.units) if u > 0]) for a in plan.allocations],
        total_cost=plan.cost, ship_cost_total=plan.ship_total, unit_cost_total=plan.unit_total,
        split_penalty_total=plan.split_penalty_total, locations_used=plan.locations_used)


class RoutingServicer(rp_grpc.RoutingServiceServicer):
    def __init__(self, routing: RoutingService) -> None:
        self.routing = routing

    def _order(self, msg: rp.RoutingOrder) -> tuple[rm.Order, Channel]:
        return order_in(msg, self.routing.ctx.settings.split_penalty)

    async def RouteOrder(self, request: rp.RouteOrderRequest, context: Any) -> rp.RouteOrderResponse:
        async def run() -> rp.RouteOrderResponse:
            order, channel = self._order(request.order)
            result = await self.routing.route(order, channel, principal=current_principal())
            out = rp.RouteOrderResponse(
                alternatives=[plan_out(order, p) for p in result.alternatives],
                excluded=[rp.ExcludedLocation(location_id=x.location_id,
                                              reason=_REASONS[x.reason])
                          for x in result.exclusions],
                shortfall=[rp.LineShortfall(sku=s.sku, requested=s.requested,
                                            obtainable=s.obtainable) for s in result.shortfall],
                suggested_pickup_location_ids=list(result.suggested_pickup_ids))
            if result.plan is not None:
                out.plan.CopyFrom(plan_out(order, result.plan))
            return out
        return await guarded(context, run())

    async def RouteAndReserve(self, request: rp.RouteAndReserveRequest, context: Any) -> rp.RouteAndReserveResponse:  # noqa: E501
        @built_once
        def encode(r: RoutedReservation) -> rp.RouteAndReserveResponse:
            return rp.RouteAndReserveResponse(
                plan=plan_out(r.order, r.plan), reservation=cv.reservation_out(r.reservation),
                attempts=r.attempts)

        async def run() -> rp.RouteAndReserveResponse:
            order, channel = self._order(request.order)
            idem = idem_for("RouteAndReserve", request, request.idempotency_key, encode)
            out = await self.routing.route_and_reserve(order, channel, request.ttl_seconds,
                                                       request.order_ref, idem,
                                                       principal=current_principal())
            return _replayed(out, rp.RouteAndReserveResponse, encode)
        return await guarded(context, run())
