"""Shared by the security tests: principals files, keyed stubs, a service with principals."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.server import Running, serve
from tests.conftest import Stores, settings_for


@dataclass(frozen=True)
class Entry:
    """One [[principal]] of a principals file, with its API key in clear (the file has its hash)."""

    name: str
    role: str
    key: str = ""
    channels: Sequence[str] = ()
    locations: Sequence[str] = ()
    location_prefixes: Sequence[str] = ()
    mtls_identities: Sequence[str] = ()
    quotas: dict[str, float] | None = None


def _list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"


def principals_toml(entries: Sequence[Entry]) -> str:
    out = []
    for e in entries:
        out.append("[[principal]]")
        out.append(f'name = "{e.name}"')
        out.append(f'role = "{e.role}"')
        if e.key:
            out.append(f"keys_sha256 = {_list([hashlib.sha256(e.key.encode()).hexdigest()])}")
        for field in ("channels", "locations", "location_prefixes", "mtls_identities"):
            if getattr(e, field):
                out.append(f"{field} = {_list(getattr(e, field))}")
        if e.quotas:
            out.append("[principal.quotas]")
            out += [f"{k} = {v}" for k, v in e.quotas.items()]
        out.append("")
    return "\n".join(out)


def write_principals(path: Path, entries: Sequence[Entry]) -> str:
    path.write_text(principals_toml(entries))
    return str(path)


@asynccontextmanager
async def service_with(stores: Stores, tmp_path: Path, entries: Sequence[Entry],
                       **overrides: Any) -> AsyncIterator[Running]:
    file = write_principals(tmp_path / "principals.toml", entries)
    async with serve(settings_for(stores, principals_file=file, **overrides)) as running:
        yield running


class Client:
    """Stubs that send one principal's key with every call."""

    def __init__(self, channel: grpc.aio.Channel, key: str) -> None:
        self.channel = channel
        self.meta = (("x-api-key", key),) if key else ()
        self.inv = api_grpc.InventoryServiceStub(channel)
        self.routing = rp_grpc.RoutingServiceStub(channel)

    async def call(self, method: Any, request: Any, **kw: Any) -> Any:
        return await method(request, metadata=self.meta, **kw)
