"""Input fuzzing of every RPC: ≥ 10k generated malformed or extreme messages (empty, oversized,
negative, NaN/inf coordinates, unicode, duplicate lines, unknown ids and enums), and malformed
bytes sent raw (truncated or garbled protobuf, invalid UTF-8 and lone surrogates in string fields,
strings up to ~100 KB, lists past their caps): no crash, never INTERNAL or UNKNOWN, and every
refusal names its field (DESIGN §4) — `request` for bytes that do not decode."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.transport.admission import ListCaps
from tests.conftest import Stores
from tests.faults.harness import check_all, make_world, own_site, running, site_settings
from tests.grpc_helpers import details
from tests.wire import delimited

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)


class Gen:
    def __init__(self, rng: random.Random, skus: list[str], locs: list[str]) -> None:
        self.r, self.skus, self.locs = rng, skus, locs
        self.res_ids: list[str] = ["r-unknown", ""]

    def text(self) -> str:
        r = self.r
        return r.choice([
            "", " ", "x" * r.choice([63, 64, 65, 129, 257, 5000]), "SKU with space", "a{b}c",
            "pipe|d", "\x00nul", "ñandú-ü", "🦄" * r.randint(1, 70), "\u202eRTL", "-lead",
            "..", "ok-id_1.2", uuid_like(r), "\ud7ff", "tab\tx", "NaN",
        ])

    def sku(self) -> str:
        return self.r.choice(self.skus) if self.r.random() < 0.5 else self.text()

    def loc(self) -> str:
        return self.r.choice(self.locs) if self.r.random() < 0.5 else self.text()

    def qty(self) -> int:
        r = self.r
        return r.choice([0, -1, 1, 2, 5, 10**9, 10**9 + 1, INT64[0], INT64[1], r.randint(-50, 50)])

    def i32(self) -> int:
        return self.r.choice([0, -1, 1, 60, 86_401, INT32[0], INT32[1], self.r.randint(-9, 900)])

    def real(self) -> float:
        r = self.r
        return r.choice([math.nan, math.inf, -math.inf, 0.0, -0.0, 90.0, 90.0001, -180.5, 1e308,
                         -1e-308, r.uniform(-200, 200)])

    def enum(self) -> int:
        return self.r.choice([0, 1, 2, 3, 5, 6, 7, 99, -1, INT32[1]])

    def key(self) -> str:
        return self.r.choice(["", "k-" + uuid_like(self.r), "x" * 129, "🦄" * 40])

    def lines(self) -> list[pb.ReservationLine]:
        r = self.r
        n = r.choice([0, 1, 2, 3, 201])
        out = [pb.ReservationLine(sku=self.sku(), location_id=self.loc(), quantity=self.qty())
               for _ in range(min(n, 5))]
        if n == 201:
            out = [pb.ReservationLine(sku=f"S{i}", location_id=self.locs[0], quantity=1)
                   for i in range(201)]
        if out and r.random() < 0.2:
            out.append(out[0])  # a duplicate line
        return out

    def items(self) -> list[api.SkuQuantity]:
        return [api.SkuQuantity(sku=x.sku, quantity=x.quantity) for x in self.lines()]

    def location(self) -> pb.Location:
        r = self.r
        return pb.Location(id=self.loc(), name=self.text()[:300], type=self.enum(), lat=self.real(),
                           lon=self.real(), can_ship=r.random() < 0.5, active=r.random() < 0.5,
                           priority=self.i32(), fixed_cost=self.real(), cost_per_km=self.real(),
                           cost_per_unit=self.real(), daily_capacity=self.i32(),
                           default_safety_stock=self.qty())

    def order(self) -> rp.RoutingOrder:
        r = self.r
        o = rp.RoutingOrder(
            lines=[rp.OrderLine(sku=self.sku(), quantity=self.qty())
                   for _ in range(r.choice([0, 1, 2, 4]))],
            method=self.enum(), dest_lat=self.real(), dest_lon=self.real(),
            pickup_location_id=self.loc() if r.random() < 0.5 else "",
            max_shipments=self.i32(), policy=self.enum(), channel=self.enum(),
            alternatives=self.i32(), excluded_location_ids=[self.loc()])
        if r.random() < 0.5:
            o.split_penalty = self.real()
        if r.random() < 0.5:
            o.max_distance_km = self.real()
        return o


def uuid_like(r: random.Random) -> str:
    return f"{r.getrandbits(64):016x}"


def requests(g: Gen) -> list[tuple[str, Callable[[Any, Any], Any], Any]]:
    """One generated request per RPC: (name, how to call it, request)."""
    r = g.r
    res = r.choice(g.res_ids)
    ch = g.enum()
    return [
        ("UpsertLocations", lambda s, q: s.UpsertLocations(q),
         api.UpsertLocationsRequest(locations=[g.location() for _ in range(r.choice([0, 1, 2]))],
                                    idempotency_key=g.key())),
        ("ListLocations", lambda s, q: s.ListLocations(q),
         api.ListLocationsRequest(ids=[g.loc()], type=g.enum())),
        ("SetStock", lambda s, q: s.SetStock(q),
         api.SetStockRequest(sku=g.sku(), location_id=g.loc(), on_hand=g.qty(),
                             expected_version=g.qty(), reason=g.text(), idempotency_key=g.key(),
                             channel=ch)),
        ("AdjustStock", lambda s, q: s.AdjustStock(q),
         api.AdjustStockRequest(sku=g.sku(), location_id=g.loc(), delta=g.qty(),
                                reason=g.enum(), note=g.text(), idempotency_key=g.key(),
                                channel=ch)),
        ("ImportStock", lambda s, q: s.ImportStock(iter(q)),
         [api.ImportStockRequest(rows=[api.ImportRow(sku=g.sku(), location_id=g.loc(),
                                                     on_hand=g.qty(), safety_stock=g.qty())
                                       for _ in range(r.choice([0, 1, 3]))],
                                 idempotency_key=g.key(), reason=g.text())
          for _ in range(r.choice([0, 1, 2]))]),
        ("TransferStock", lambda s, q: s.TransferStock(q),
         api.TransferStockRequest(sku=g.sku(), from_location_id=g.loc(), to_location_id=g.loc(),
                                  quantity=g.qty(), reason=g.text(), idempotency_key=g.key(),
                                  channel=ch)),
        ("SetSafetyStock", lambda s, q: s.SetSafetyStock(q),
         api.SetSafetyStockRequest(sku=g.sku(), location_id=g.loc(), safety_stock=g.qty(),
                                   idempotency_key=g.key(), channel=ch)),
        ("GetAvailability", lambda s, q: s.GetAvailability(q),
         api.GetAvailabilityRequest(skus=[g.sku() for _ in range(r.choice([0, 1, 3]))],
                                    location_ids=[g.loc()] if r.random() < 0.5 else [],
                                    channel=ch)),
        ("FindNearby", lambda s, q: s.FindNearby(q),
         api.FindNearbyRequest(items=g.items(), lat=g.real(), lon=g.real(), radius_km=g.real(),
                               channel=ch, limit=g.i32(), pickup_only=r.random() < 0.5)),
        ("Reserve", lambda s, q: s.Reserve(q),
         api.ReserveRequest(lines=g.lines(), ttl_seconds=g.i32(), channel=ch,
                            order_ref=g.text(), idempotency_key=g.key())),
        ("GetReservation", lambda s, q: s.GetReservation(q),
         api.GetReservationRequest(reservation_id=r.choice([res, g.text()]))),
        ("ExtendReservation", lambda s, q: s.ExtendReservation(q),
         api.ExtendReservationRequest(reservation_id=r.choice([res, g.text()]),
                                      ttl_seconds=g.i32(), idempotency_key=g.key())),
        ("ReleaseReservation", lambda s, q: s.ReleaseReservation(q),
         api.ReleaseReservationRequest(reservation_id=r.choice([res, g.text()]),
                                       lines=g.lines() if r.random() < 0.5 else [],
                                       idempotency_key=g.key())),
        ("CommitReservation", lambda s, q: s.CommitReservation(q),
         api.CommitReservationRequest(reservation_id=r.choice([res, g.text()]),
                                      idempotency_key=g.key())),
        ("Sell", lambda s, q: s.Sell(q),
         api.SellRequest(location_id=g.loc(), items=g.items(), order_ref=g.text(),
                         idempotency_key=g.key(), channel=ch)),
        ("ReturnItems", lambda s, q: s.ReturnItems(q),
         api.ReturnItemsRequest(location_id=g.loc(), items=g.items(), order_ref=g.text(),
                                reason=g.text(), idempotency_key=g.key(), channel=ch)),
        ("ListMovements", lambda s, q: s.ListMovements(q),
         api.ListMovementsRequest(sku=g.sku(), location_id=g.loc(),
                                  order_ref=g.text() if r.random() < 0.3 else "",
                                  reservation_id=r.choice(["", res]), page_size=g.i32(),
                                  page_token=r.choice(["", "m1", "mx", "m-1", g.text()]))),
        ("RouteOrder", lambda s, q: s.route.RouteOrder(q),
         rp.RouteOrderRequest(order=g.order())),
        ("RouteAndReserve", lambda s, q: s.route.RouteAndReserve(q),
         rp.RouteAndReserveRequest(order=g.order(), ttl_seconds=g.i32(), order_ref=g.text(),
                                   idempotency_key=g.key())),
    ]


# ---- raw bytes ------------------------------------------------------------------------------------
# Not UTF-8, or UTF-8 of what no string may hold: CESU-8 surrogates (U+D800, U+DFFF), a stray
# continuation byte, an overlong "/", a truncated sequence, bytes that never occur in UTF-8.
BAD_UTF8 = [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"a\x80b", b"\xc0\xaf", b"\xe2\x28\xa1", b"\xc3",
            b"\xff\xfe", b"ok\xf0\x9f\xa6"]
SERVICES = {"RouteOrder": "/inventory.v1.RoutingService/",
            "RouteAndReserve": "/inventory.v1.RoutingService/"}
STRING, MESSAGE = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE


def fields_of(desc: Descriptor, kind: int) -> list[FieldDescriptor]:
    return [f for f in desc.fields if f.type == kind
            and not (kind == MESSAGE and f.message_type.GetOptions().map_entry)]


def bad_string(r: random.Random, desc: Descriptor) -> bytes:
    """A string field of the message, or of a message inside it, holding bad UTF-8: appended
    (a repeated field gains an element, a singular one is overwritten: the last one counts)."""
    bad = r.choice(BAD_UTF8)
    nested = [(m, s) for m in fields_of(desc, MESSAGE)
              for s in fields_of(m.message_type, STRING)]
    top = fields_of(desc, STRING)
    if nested and (not top or r.random() < 0.5):
        m, f = r.choice(nested)
        return delimited(m.number, delimited(f.number, bad))
    return delimited(r.choice(top).number, bad)


def huge_string(r: random.Random, msg: Message) -> Message:
    """The message with one string field (its own, or its first element's) ~10-100 KB long."""
    out = type(msg)()
    out.CopyFrom(msg)
    value = r.choice(["x", "\u00e9", "\U0001F984", "a b"]) * r.choice([2_500, 25_000])
    targets: list[tuple[Message, FieldDescriptor]] = [(out, f) for f in fields_of(out.DESCRIPTOR,
                                                                                  STRING)]
    for m in fields_of(out.DESCRIPTOR, MESSAGE):
        inner = getattr(out, m.name)
        if m.is_repeated:
            first = inner[0] if len(inner) else inner.add()
            targets += [(first, f) for f in fields_of(m.message_type, STRING)]
        else:
            targets += [(inner, f) for f in fields_of(m.message_type, STRING)]
    holder, f = r.choice(targets)
    if f.is_repeated:
        getattr(holder, f.name).append(value)
    else:
        setattr(holder, f.name, value)
    return out


def long_lists(msg: Message, caps: ListCaps) -> tuple[Message, set[str]] | None:
    """The message with every list it has (its own, and its order's) one past its cap, and the
    names the refusal may give; None when it has no list with a cap worth sending."""
    out = type(msg)()
    out.CopyFrom(msg)
    names: set[str] = set()
    holders: list[tuple[Message, str]] = [(out, "")]
    if out.DESCRIPTOR.fields_by_name.get("order"):
        holders.append((out.order, "order."))  # type: ignore[attr-defined]
    for holder, prefix in holders:
        for f in holder.DESCRIPTOR.fields:
            n = caps.of(f.name) + 1
            if not f.is_repeated or n > 20_000:
                continue
            items = getattr(holder, f.name)
            del items[:]
            if f.type == STRING:
                items.extend(f"v{i}" for i in range(n))
            else:
                for _ in range(n):
                    items.add()
            names.add(prefix + f.name)
    return (out, names) if names else None


def mutate(r: random.Random, request: Any, caps: ListCaps) -> tuple[str, list[bytes], set[str]]:
    """(what was done, the raw messages to send, the fields a RESOURCE_EXHAUSTED must name, if
    it must be one)."""
    stream = isinstance(request, list)
    msgs: list[Message] = list(request) if stream else [request]
    if not msgs:
        msgs = [api.ImportStockRequest()]
    i = r.randrange(len(msgs))
    body = msgs[i].SerializeToString()
    how = r.choice(["truncate", "flip", "garbage", "bad-utf8", "bad-utf8", "huge", "lists"])
    must: set[str] = set()
    if how == "truncate" and len(body) > 1:
        body = body[:r.randrange(1, len(body))]
    elif how == "flip" and body:
        buf = bytearray(body)
        for _ in range(r.randint(1, 4)):
            buf[r.randrange(len(buf))] = r.randrange(256)
        body = bytes(buf)
    elif how == "bad-utf8":
        body += bad_string(r, msgs[i].DESCRIPTOR)
    elif how == "huge":
        body = huge_string(r, msgs[i]).SerializeToString()
    elif how == "lists" and (made := long_lists(msgs[i], caps)) is not None:
        body, must = made[0].SerializeToString(), made[1]
    else:
        how = "garbage"
        body = r.randbytes(r.randint(1, 64))
    raws = [m.SerializeToString() for m in msgs]
    raws[i] = body
    return how, raws, must


def root_fields(request: Any) -> set[str]:
    msg = request[0] if isinstance(request, list) and request else request
    if isinstance(msg, list):  # an empty ImportStock stream (raw mutations send one message)
        return set(api.ImportStockRequest.DESCRIPTOR.fields_by_name)
    return {f.name for f in msg.DESCRIPTOR.fields}


def judge(err: grpc.aio.AioRpcError, where: str, roots: set[str], must: set[str],
          problems: list[str]) -> None:
    """A refusal must be one a client may see, arrive whole, and name what it refuses."""
    code = err.code()
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        problems.append(where)
        return
    if must and code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        problems.append(f"lists over their caps not refused as such: {where}")
        return
    try:
        found = details(err)
    except (ValueError, AssertionError) as exc:  # the answer did not arrive whole
        problems.append(f"{exc}: {where}")
        return
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        fields = [v.field for d in found if isinstance(d, error_details_pb2.BadRequest)
                  for v in d.field_violations]
        if not fields or any(f.split("[")[0].split(".")[0] not in roots for f in fields):
            problems.append(f"refusal without its field ({fields}): {where}")
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        subjects = [v.subject for d in found if isinstance(d, error_details_pb2.QuotaFailure)
                    for v in d.violations]
        if not all(subjects) or not subjects or (must and not set(subjects) <= must):
            problems.append(f"limit without its field ({subjects}): {where}")
    elif not (err.details() or ""):
        problems.append(f"refusal without a message: {where}")


async def test_fuzz_every_rpc(stores: Stores, soak: bool) -> None:
    total = 100_000 if soak else 8_000
    raw_total = 20_000 if soak else 2_000
    rng = random.Random(11)
    async with own_site(stores) as site, running(site_settings(stores, site)) as (svc, stub, ch):
        w = await make_world(stub, locations=2, skus=3, on_hand=50)
        stub.route = rp_grpc.RoutingServiceStub(ch)  # type: ignore[attr-defined]
        g = Gen(rng, w.skus, w.locations)
        caps = ListCaps(lines=svc.settings.max_lines, skus=svc.settings.max_skus_per_read,
                        ids=svc.settings.max_ids_per_read, rows=svc.settings.import_max_rows)
        codes: Counter[str] = Counter()
        raw_codes: Counter[str] = Counter()
        problems: list[str] = []
        sent = 0

        async def one(name: str, call: Callable[[Any, Any], Any], request: Any) -> None:
            try:
                out = await call(stub, request)
                codes["OK"] += 1
                if name in ("Reserve", "RouteAndReserve"):
                    g.res_ids.append(out.reservation.id)
                return
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] += 1
                where = f"{name}({str(request)[:200]!r}) -> {err.code().name}: {err.details()}"
                judge(err, where, root_fields(request), set(), problems)

        async def raw(name: str, request: Any) -> None:
            how, bodies, must = mutate(rng, request, caps)
            path = SERVICES.get(name, "/inventory.v1.InventoryService/") + name
            try:
                if name == "ImportStock":
                    await ch.stream_unary(path, None, None)(iter(bodies), timeout=30)
                else:
                    await ch.unary_unary(path, None, None)(bodies[0], timeout=30)
                raw_codes[f"{how}:OK"] += 1  # the mutation left a message that decodes
                if must:
                    problems.append(f"{name} {how}: lists over their caps accepted")
            except grpc.aio.AioRpcError as err:
                raw_codes[f"{how}:{err.code().name}"] += 1
                where = (f"{name} {how}({b''.join(bodies)[:120]!r}) -> {err.code().name}: "
                         f"{err.details()}")
                judge(err, where, root_fields(request) | {"request"}, must, problems)

        while sent < total:
            batch = [x for _ in range(4) for x in requests(g)]
            sent += len(batch)
            await asyncio.gather(*(one(*x) for x in batch))
        raw_sent = 0
        while raw_sent < raw_total:
            batch = [x for _ in range(2) for x in requests(g)]
            raw_sent += len(batch)
            await asyncio.gather(*(raw(name, request) for name, _, request in batch))
        assert not problems, f"{len(problems)} bad answers, e.g. {problems[:5]}"
        await check_all(svc.ctx.pg.pool, svc.ctx.redis.client, w.skus)
        print(f"fuzz: {sent} messages over 19 RPCs: {dict(codes)}; {raw_sent} raw: "
              f"{dict(sorted(raw_codes.items()))}")
