"""Keeps Redis's key filter (storage/redis_keys.py) whole: starts it when it is missing, and
fills it from Postgres before anyone trusts it.

A filter started on an empty Redis (first start, or Redis lost its data) lacks the keys whose
holds were on the lost data. Those calls gave up or committed within hold_timeout_s of their
hold, and their holds came before the loss, so the keeper waits that long after it first saw
the epoch, then adds every key Postgres still remembers of the taking methods, and only then
marks the filter complete. Calls holding meanwhile set their own bits. Runs where the
reconciler runs; two keepers at once (two replicas) only add the same bits twice.
"""

from __future__ import annotations

import logging
import time

from inventory_svc.app.context import Context
from inventory_svc.storage import redis_keys
from inventory_svc.storage.pg_base import keys_page, translate_errors
from inventory_svc.storage.redis_stock import translate_redis

log = logging.getLogger(__name__)
PAGE = 500  # keys a step: its Redis script and its Python work stall their loops ~5 ms
MARGIN_S = 1.0  # beyond hold_timeout_s: the holds' own clock and ours are not the same


class KeyFilterKeeper:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._seen: tuple[str, float] | None = None  # (epoch, monotonic time first seen)

    @property
    def active(self) -> bool:
        return self.ctx.redis.key_filter is not None

    async def step(self) -> bool:
        """One look: start the filter, or fill it once its wait is over. True when complete."""
        shape = self.ctx.redis.key_filter
        if shape is None:
            return False
        client = self.ctx.redis.client
        with translate_redis():
            epoch, done = await redis_keys.filter_state(client)
            if done:
                return True
            if epoch is None:
                epoch = await redis_keys.start_epoch(client)
        if self._seen is None or self._seen[0] != epoch:
            self._seen = (epoch, time.monotonic())
        if time.monotonic() - self._seen[1] < self.ctx.settings.hold_timeout_s + MARGIN_S:
            return False
        start, after, n = time.monotonic(), "", 0
        window_s = shape.window_s + shape.bucket_s  # what the buckets looked up may hold
        while True:
            with translate_errors():
                async with self.ctx.pg.pool.acquire(
                        timeout=self.ctx.settings.pg_timeout_s) as conn:
                    page = await keys_page(
                        conn, list(redis_keys.TAKING_METHODS), window_s, after, PAGE)
            if not page:
                break
            with translate_redis():
                await redis_keys.add_keys(client, shape, page, time.time())
            after, n = page[-1][0], n + len(page)
        with translate_redis():
            if not await redis_keys.complete(client, epoch):
                log.warning("redis lost the key filter while it was being filled: starting again")
                return False
        log.info("key filter complete: %d idempotency keys from postgres in %.1f s", n,
                 time.monotonic() - start)
        return True
