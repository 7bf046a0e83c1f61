"""Which idempotency keys have taken stock: a Bloom filter in Redis (one Redis server only).

A keyed Reserve, Sell or RouteAndReserve that loses on stock must answer with the first call's
answer if an earlier call with its key took stock (DESIGN I6). Asking Postgres costs every loser
of a flash sale a statement; the filter answers most of them in the hold script itself. Every
successful hold of a keyed call sets its key's bits, in the same script as the hold, so a key
whose answer Postgres may hold has its bits set before its commit is even sent. A short hold
whose key has a clear bit in every bucket has surely never taken stock: it answers "short"
without Postgres. A false positive (all bits set by other keys) only sends the loser to
Postgres, as before; the filter never answers wrongly, it answers less often as it fills.

Buckets by time (a third of the idempotency window each, one bitmap of `bits` bits): a key is
looked up in every bucket that may hold a key whose answer Postgres still keeps, so each
bucket expires once no such key can be in it. The filter is trusted only once it is complete:
the meta hash holds an epoch, created when the filter was found missing (first start, or Redis
lost its data: the meta hash goes with it), and `keys_complete` equal to it once the keeper
has added every key Postgres remembers (`KeyFilterKeeper`). Until then every loser asks
Postgres. A Redis Cluster keeps no filter: there the hold scripts of one call run on several
nodes, and the losers ask Postgres.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

META_KEY = "inv:meta"
BUCKET_PREFIX = "inv:keys:"
HASHES = 7  # bits per key: ~1 % false positives at 9.6 bits a key
# the methods whose keyed calls hold stock (and so set their key's bits)
TAKING_METHODS = ("Reserve", "Sell", "RouteAndReserve")


@dataclass(frozen=True, slots=True)
class KeyProbe:
    """What hold.lua needs for one key: the buckets (the current one first) and its bits."""

    buckets: tuple[str, ...]
    offsets: tuple[int, ...]
    expire_at_ms: int


@dataclass(frozen=True, slots=True)
class KeyFilter:
    """The filter's shape: `bits` per bucket; keys kept for `window_s` (the idempotency
    retention) plus one bucket; clocks of the replicas may differ by up to a bucket."""

    bits: int
    window_s: float

    @property
    def bucket_s(self) -> float:
        return max(self.window_s / 3, 60.0)

    def bucket_of(self, at_s: float) -> int:
        return int(at_s // self.bucket_s)

    def probe(self, key: str, now_s: float, *, at_s: float | None = None) -> KeyProbe:
        """The probe of `key` looked up at `now_s`; its bits go to the bucket of `at_s` (the
        time it took stock; now by default)."""
        current = self.bucket_of(now_s if at_s is None else at_s)
        buckets, expire_at_ms = _buckets(self.bucket_s, self.window_s, current,
                                         self.bucket_of(now_s))
        return KeyProbe(buckets, self.offsets(key), expire_at_ms)

    def offsets(self, key: str) -> tuple[int, ...]:
        # double hashing (Kirsch-Mitzenmacher): two 64-bit halves of one digest give all bits
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        h1 = int.from_bytes(digest[:8], "little")
        h2 = int.from_bytes(digest[8:], "little") | 1
        return tuple((h1 + i * h2) % self.bits for i in range(HASHES))


@functools.lru_cache(maxsize=16)  # the same few answers all day: every call asks
def _buckets(bucket_s: float, window_s: float, current: int, now: int
             ) -> tuple[tuple[str, ...], int]:
    """The buckets to look in (`current`, where the bits go, first) and `current`'s expiry."""
    back = math.ceil((window_s + bucket_s) / bucket_s) + 1
    looked = [b for b in range(now + 1, now - back - 1, -1) if b != current]
    # a bucket lives until no key in it can still have an answer in Postgres (and a bucket
    # more, for the replicas' clocks)
    expire_at = (current + 1) * bucket_s + window_s + 2 * bucket_s
    return tuple(f"{BUCKET_PREFIX}{b}" for b in (current, *looked)), int(expire_at * 1000)


async def filter_state(client: Any) -> tuple[str | None, bool]:
    """The filter's epoch (None: no filter yet) and whether it is complete."""
    epoch, complete = await client.hmget(META_KEY, ["keys_epoch", "keys_complete"])
    text = None if epoch is None else text_of(epoch)
    return text, text is not None and complete is not None and text_of(complete) == text


async def start_epoch(client: Any) -> str:
    """Start a filter if none is (HSETNX: of many keepers one starts it); its epoch."""
    await client.hsetnx(META_KEY, "keys_epoch", secrets.token_hex(8))
    return text_of(await client.hget(META_KEY, "keys_epoch"))


async def reset(client: Any) -> None:
    """Forget the filter's epoch: a new filter starts and is filled before it is trusted."""
    await client.hdel(META_KEY, "keys_epoch", "keys_complete")


_COMPLETE = """
-- KEYS[1] the meta hash; ARGV[1] the epoch the keeper filled
-- Returns 1 if the filter is now complete, 0 if its epoch changed meanwhile (Redis lost its data)
if redis.call('HGET', KEYS[1], 'keys_epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'keys_complete', ARGV[1])
return 1
"""


async def complete(client: Any, epoch: str) -> bool:
    """Mark the filter of `epoch` complete, unless Redis lost it meanwhile."""
    return bool(await client.eval(_COMPLETE, 1, META_KEY, epoch))


_SET_BITS = """
-- KEYS[1] a bucket; ARGV[1] its expiry (Unix ms), ARGV[2..] bit offsets to set
-- Returns the number of bits set (the keeper's fill: one command a bucket, not one a bit)
for i = 2, #ARGV do redis.call('SETBIT', KEYS[1], ARGV[i], 1) end
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return #ARGV - 1
"""


async def add_keys(client: Any, shape: KeyFilter, keys: Iterable[tuple[str, float]],
                   now_s: float) -> None:
    """Set the bits of (key, time it took stock) pairs: one script a bucket (a page of the
    keeper's fill is a few commands, where a command a bit cost the event loop ~30 µs a
    bit in the client)."""
    bits: dict[str, tuple[int, list[int]]] = {}  # bucket: (expiry ms, offsets)
    for key, at_s in keys:
        probe = shape.probe(key, now_s, at_s=at_s)
        bits.setdefault(probe.buckets[0], (probe.expire_at_ms, []))[1].extend(probe.offsets)
    for bucket, (at_ms, offsets) in bits.items():
        await client.eval(_SET_BITS, 1, bucket, at_ms, *offsets)


def text_of(value: bytes | str) -> str:
    """A Redis reply as text (clients made with or without decode_responses)."""
    return value.decode() if isinstance(value, bytes) else value
