"""Principals from configuration: API keys (hashed) and mTLS identities → Principal.

Two sources, merged: INVENTORY_API_KEYS, the simple form `key:role[:LOC|PREFIX*...]`, and
INVENTORY_PRINCIPALS_FILE, a TOML file of `[[principal]]` tables (docs/SECURITY.md). Keys are
kept only as SHA-256 digests: API keys are long random tokens, so a fast hash is enough (unlike
passwords), and a digest is what the file stores, so a leaked file leaks no key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from inventory_svc.domain.model import Channel
from inventory_svc.domain.principal import ANONYMOUS, Principal, Quotas, Role, principal

if TYPE_CHECKING:
    from inventory_svc.config import Settings

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_PRINCIPAL_KEYS = {"name", "role", "keys_sha256", "mtls_identities", "channels", "locations",
                   "location_prefixes", "quotas"}


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class Registry:
    """Who may call. `open`: nobody is configured, every call is ANONYMOUS (loopback only)."""

    by_digest: Mapping[bytes, Principal] = field(default_factory=dict)
    by_identity: Mapping[str, Principal] = field(default_factory=dict)
    # digest[:8] → (digest, principal): the lookup by a short prefix of a SHA-256 tells a timing
    # observer nothing useful; the comparison of the whole digest runs in constant time.
    _index: Mapping[bytes, tuple[tuple[bytes, Principal], ...]] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[bytes, list[tuple[bytes, Principal]]] = {}
        for digest, p in self.by_digest.items():
            index.setdefault(digest[:8], []).append((digest, p))
        object.__setattr__(self, "_index", {k: tuple(v) for k, v in index.items()})

    @property
    def open(self) -> bool:
        return not self.by_digest and not self.by_identity

    def by_key(self, key: str) -> Principal | None:
        if not key:
            return None
        digest = key_digest(key)
        for stored, p in self._index.get(digest[:8], ()):
            if hmac.compare_digest(stored, digest):
                return p
        return None

    def by_identities(self, identities: Iterable[str]) -> Principal | None:
        """The principal of the first mTLS identity (subject CN or SAN) that maps to one."""
        for ident in identities:
            if (p := self.by_identity.get(ident)) is not None:
                return p
        return None


OPEN = Registry()


def load_principals(settings: Settings) -> Registry:
    """The registry the settings describe; ValueError naming the variable and the entry."""
    by_digest: dict[bytes, Principal] = {}
    by_identity: dict[str, Principal] = {}
    names: set[str] = set()

    def add(p: Principal, digests: Iterable[bytes], identities: Iterable[str], where: str) -> None:
        if p.name in names:
            raise ValueError(f"{where}: principal {p.name!r} is defined twice")
        names.add(p.name)
        for d in digests:
            if d in by_digest:
                raise ValueError(f"{where}: principal {p.name!r} shares a key with "
                                 f"{by_digest[d].name!r}")
            by_digest[d] = p
        for ident in identities:
            if ident in by_identity:
                raise ValueError(f"{where}: mTLS identity {ident[:64]!r} maps to two principals")
            by_identity[ident] = p

    for item in filter(None, (x.strip() for x in settings.api_keys.split(","))):
        p, key = _simple(item)
        add(p, [key_digest(key)], [], "INVENTORY_API_KEYS")
    if settings.principals_file:
        where = f"INVENTORY_PRINCIPALS_FILE={settings.principals_file}"
        try:
            with open(settings.principals_file, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        entries = doc.get("principal", [])
        if not isinstance(entries, list):
            raise ValueError(f"{where}: expected [[principal]] tables")
        for i, entry in enumerate(entries):
            p, digests, identities = _entry(entry, f"{where}: principal[{i}]")
            add(p, digests, identities, where)
    return Registry(by_digest, by_identity)


def _simple(item: str) -> tuple[Principal, str]:
    """`key:role[:LOC|PREFIX*...]`; the principal's name is derived from the key's digest."""
    key, _, rest = item.partition(":")
    role_name, _, scope = rest.partition(":")
    hint = f"INVENTORY_API_KEYS: entry {key[:4]}…"
    try:
        role = Role(role_name)
    except ValueError:
        raise ValueError(f"{hint}: role must be one of {sorted(r.value for r in Role)}") from None
    if not key:
        raise ValueError(f"{hint}: empty key")
    parts = [x for x in scope.split("|") if x]
    locations = [x for x in parts if not x.endswith("*")]
    prefixes = [x[:-1] for x in parts if x.endswith("*")]
    name = f"key-{key_digest(key).hex()[:12]}"
    try:
        return principal(name, role, locations=locations, location_prefixes=prefixes), key
    except ValueError as exc:
        raise ValueError(f"{hint}: {exc}") from None


def _entry(entry: Any, where: str) -> tuple[Principal, list[bytes], list[str]]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table")
    unknown = set(entry) - _PRINCIPAL_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    name = entry.get("name", "")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"{where}: name must be 1-64 characters of [A-Za-z0-9_.-]")
    where = f"{where} ({name})"
    try:
        role = Role(entry.get("role", ""))
    except ValueError:
        raise ValueError(f"{where}: role must be one of {sorted(r.value for r in Role)}") from None
    digests = []
    for d in _strings(entry, "keys_sha256", where):
        if not _DIGEST_RE.fullmatch(d.lower()):
            raise ValueError(f"{where}: keys_sha256 holds 64 hex digits per key")
        digests.append(bytes.fromhex(d))
    identities = _strings(entry, "mtls_identities", where)
    if not digests and not identities:
        raise ValueError(f"{where}: needs keys_sha256 or mtls_identities")
    try:
        channels = [Channel(c.upper().removeprefix("CHANNEL_"))
                    for c in _strings(entry, "channels", where)]
    except ValueError:
        raise ValueError(f"{where}: channels are {[c.value for c in Channel]}") from None
    quotas = entry.get("quotas", {})
    if not isinstance(quotas, dict):
        raise ValueError(f"{where}: quotas must be a table")
    known = {f.name for f in fields(Quotas)}
    if set(quotas) - known:
        raise ValueError(f"{where}: unknown quotas {sorted(set(quotas) - known)}")
    for k, v in quotas.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ValueError(f"{where}: quotas.{k} must be a number >= 0")
    try:
        p = principal(name, role, channels=channels,
                      locations=_strings(entry, "locations", where),
                      location_prefixes=_strings(entry, "location_prefixes", where),
                      quotas=Quotas(**quotas))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return p, digests, identities


def _strings(entry: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise ValueError(f"{where}: {key} must be a list of non-empty strings")
    return list(value)


__all__ = ["ANONYMOUS", "OPEN", "Registry", "key_digest", "load_principals"]
