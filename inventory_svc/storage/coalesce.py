"""Calls made in one turn of the event loop, sent to a store together: each caller awaits its own
answer, the store sees one request for all of them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """`send` gets the items of one turn, in call order, and returns one answer per item: its
    result, or the exception to raise to that caller alone. An exception `send` raises reaches
    every caller of the turn.

    `start`, when given, is tried first: it sends the items at once, without waiting, and
    returns a future of their answers (or None when it cannot, e.g. while no connection is up;
    then `send` runs). The turn's request then goes out as the turn ends, with no task and no
    further turn of the loop before it: at low load each call pays for those, not shares them."""

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R | BaseException]]],
                 start: Callable[[list[T]], asyncio.Future[list[R | BaseException]] | None]
                 | None = None) -> None:
        self._send = send
        self._start = start
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.sends = 0  # requests made of the store

    async def run(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[R] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((item, answer))
        return await answer

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        if self._start is not None:
            try:
                started = self._start([item for item, _ in batch])
            except BaseException as exc:  # every caller of the turn hears it
                failed: list[R | BaseException] = [exc] * len(batch)
                _resolve(batch, failed)
                return
            if started is not None:
                self.sends += 1
                started.add_done_callback(functools.partial(_delivered, batch))
                return
        task = asyncio.create_task(self._deliver(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _deliver(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.sends += 1
        try:
            answers = await self._send([item for item, _ in batch])
        except BaseException as exc:  # every caller of the turn hears it
            answers = [exc] * len(batch)
        _resolve(batch, answers)


def _delivered(batch: list[tuple[T, asyncio.Future[R]]],
               started: asyncio.Future[list[R | BaseException]]) -> None:
    answers: list[R | BaseException]
    if started.cancelled():
        answers = [asyncio.CancelledError()] * len(batch)
    elif (exc := started.exception()) is not None:
        answers = [exc] * len(batch)
    else:
        answers = started.result()
    _resolve(batch, answers)


def _resolve(batch: list[tuple[T, asyncio.Future[R]]], answers: list[R | BaseException]) -> None:
    for (_, future), answer in zip(batch, answers, strict=True):
        if future.done():  # its caller gave up
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)
