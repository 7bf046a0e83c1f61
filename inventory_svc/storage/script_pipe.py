"""Auto-pipelining of Lua scripts: the scripts that concurrent calls run in one turn of the event
loop go to Redis as one pipeline of EVALSHA, one write and one read instead of one of each per
call. Under load many Reserve calls take their holds in the same turn; Redis and this process
then spend their time on the scripts rather than on the round trips around them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from redis.commands.core import AsyncScript

from inventory_svc.domain.errors import Unavailable
from inventory_svc.storage.coalesce import Coalescer
from inventory_svc.storage.redis_mux import RedisMux, pipeline

ScriptCall = tuple[AsyncScript, list[str], list[Any]]  # a script, its KEYS and its ARGV


class ScriptPipe:
    def __init__(self, client: Any, mux: RedisMux | None = None) -> None:
        self.client = client
        self.mux = mux
        # over the mux a turn's pipeline is written as the turn ends (Coalescer's `start`)
        self._turns: Coalescer[Sequence[ScriptCall], list[Any]] = Coalescer(
            self._send, self._start if mux is not None else None)
        self.round_trips = 0  # pipelines sent (a NOSCRIPT retry counts again)

    async def run(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """The scripts' results, in order; sent with whatever else this turn of the loop runs.
        A script that failed raises its error here, for this caller only."""
        results = await self._turns.run(calls)
        missing = [i for i, res in enumerate(results)
                   if isinstance(res, redis.exceptions.NoScriptError)]
        if missing:  # (only a pipeline written at once returns these: Redis lost the scripts)
            for script in {calls[i][0].sha: calls[i][0] for i in missing}.values():
                await self.client.script_load(script.script)
            results = list(results)
            for i, res in zip(missing, await self._pipeline([calls[i] for i in missing]),
                              strict=True):
                results[i] = res
        error = next((res for res in results if isinstance(res, Exception)), None)
        if error is not None:
            raise error
        return results

    async def _send(self, batch: list[Sequence[ScriptCall]]) -> list[list[Any] | BaseException]:
        return _split(batch, await self._pipeline([c for calls in batch for c in calls]))

    def _start(self, batch: list[Sequence[ScriptCall]]
               ) -> asyncio.Future[list[list[Any] | BaseException]] | None:
        """The turn's scripts as one pipeline of EVALSHA written now (None: no connection up).
        Calls refused with NOSCRIPT come back as such: their callers send them again (`run`)."""
        assert self.mux is not None
        future = self.mux.send_now(
            [("EVALSHA", script.sha, len(keys), *keys, *args)
             for calls in batch for script, keys, args in calls],
            functools.partial(_split, batch))
        if future is not None:
            self.round_trips += 1
        return future

    async def _pipeline(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """One round trip of EVALSHA (redis-py's own pipelined scripts cost a SCRIPT EXISTS round
        trip first). Calls refused with NOSCRIPT did not run: their scripts are loaded and they
        are sent again. A script's own error is returned in its place."""
        self.round_trips += 1
        if len(calls) == 1 and self.mux is None:
            script, keys, args = calls[0]
            try:
                return [await script(keys=keys, args=args)]
            except redis.exceptions.ResponseError as exc:
                return [exc]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            out = await self._evalsha([calls[i] for i in todo])
            missing = []
            for i, res in zip(todo, out, strict=True):
                if isinstance(res, redis.exceptions.NoScriptError):
                    missing.append(i)
                else:
                    results[i] = res
            if not missing:
                return results
            for script in {calls[i][0].sha: calls[i][0] for i in missing}.values():
                await self.client.script_load(script.script)
            todo = missing
            self.round_trips += 1
        raise Unavailable("redis keeps losing the service's scripts; retry")

    async def _evalsha(self, calls: Sequence[ScriptCall]) -> list[Any]:
        return await pipeline(self.client, self.mux, [
            ("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls])


def _split(batch: list[Sequence[ScriptCall]], results: list[Any]) -> list[list[Any] | BaseException]:
    """The pipeline's results, each caller's in a list of its own."""
    out: list[list[Any] | BaseException] = []
    at = 0
    for calls in batch:
        out.append(results[at:at + len(calls)])
        at += len(calls)
    return out
