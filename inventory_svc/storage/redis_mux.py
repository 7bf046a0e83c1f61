"""One pipelined connection to a single Redis server, for the hot path's scripts and reads.

redis-py's asyncio client spends ~85 µs of CPU on a round trip on this kind of machine: a
connection taken from the pool and given back, a retry wrapper, a timeout context, response
callbacks. Here the batches of every caller are written to one connection as they come, and the
replies, which Redis sends in the order of the commands, are handed back in that order: ~40 µs,
most of it the two system calls. Under load that is 10-25 % of a Reserve's CPU.

Over TCP or a Unix socket (unix://, which the embedded server offers: its system calls cost
about half a TCP loopback's). Not used on a cluster or over TLS (redis-py serves those):
`RedisMux.for_url` says None. Nothing is retried here: a batch that was written may have run,
so a lost connection fails the batches in flight (ConnectionError) and the next batch connects
again; a batch with no reply after `timeout_s` (TimeoutError) closes the connection, failing
the others with it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import hiredis
import redis.exceptions
from redis._parsers import BaseParser
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url

Command = tuple[str | bytes | int | float, ...]
# what a new connection runs before it serves anyone (RedisStock checks the data's server run)
OnConnect = Callable[["RedisMux", "_Link"], Awaitable[None]]


class _ReplyError(Exception):
    """hiredis's stand-in for an error reply, turned into redis-py's class for its code."""


def _error(reply: _ReplyError) -> redis.exceptions.RedisError:
    err: redis.exceptions.RedisError = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return err


Finish = Callable[[list[Any]], Any]  # what a batch's future holds, made from its replies


class _Batch:
    __slots__ = ("finish", "future", "left", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[Any], size: int, sent_at: float,
                 finish: Finish | None) -> None:
        self.future = future
        self.left = size
        self.replies: list[Any] = []
        self.sent_at = sent_at
        self.finish = finish


class _Link(asyncio.Protocol):
    """One connection: batches in the order written, each resolved when its last reply came."""

    def __init__(self, on_lost: Callable[[], None] | None = None) -> None:
        self.on_lost = on_lost
        self.reader = hiredis.Reader(replyError=_ReplyError)
        self.batches: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        batches = self.batches
        while (reply := self.reader.gets()) is not False:
            if not batches:  # a reply nobody asked for: the stream is not what we think
                self.fail(redis.exceptions.ConnectionError("redis sent a reply out of turn"))
                return
            batch = batches[0]
            batch.replies.append(_error(reply) if isinstance(reply, _ReplyError) else reply)
            batch.left -= 1
            if batch.left == 0:
                batches.popleft()
                if not batch.future.done():  # its caller may have given up
                    if batch.finish is None:
                        batch.future.set_result(batch.replies)
                    else:
                        try:
                            batch.future.set_result(batch.finish(batch.replies))
                        except Exception as exc:  # its caller's to hear, not the link's
                            batch.future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        first = self.lost is None  # not a close of our own (fail) first
        self.fail(redis.exceptions.ConnectionError(f"redis connection lost: {exc or 'closed'}"))
        if first and self.on_lost is not None:
            self.on_lost()

    def fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        while self.batches:
            future = self.batches.popleft().future
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def send(self, commands: Sequence[Command], finish: Finish | None = None
             ) -> asyncio.Future[Any]:
        """Written now; the future holds the replies in order (or `finish` of them)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.batches.append(_Batch(future, len(commands), loop.time(), finish))
        # hiredis's stub types the argument as a 1-tuple; it takes any number of arguments
        self.transport.write(b"".join(
            hiredis.pack_command(c) for c in commands))  # type: ignore[arg-type]
        return future


class RedisMux:
    def __init__(self, host: str, port: int, *, timeout_s: float, password: str | None = None,
                 username: str | None = None, db: int = 0,
                 on_connect: OnConnect | None = None,
                 on_lost: Callable[[], None] | None = None, path: str | None = None) -> None:
        self.host, self.port, self.db = host, port, db
        self.path = path  # a Unix socket's, instead of host and port
        self.username, self.password = username, password
        self.timeout_s = timeout_s
        self.on_connect = on_connect
        self.on_lost = on_lost  # the server closed the connection (it may have gone away)
        self.connects = 0  # connections made (the first, and one after each loss)
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def for_url(cls, url: str, *, timeout_s: float,
                on_connect: OnConnect | None = None,
                on_lost: Callable[[], None] | None = None) -> RedisMux | None:
        """A mux for a plain TCP URL (redis://) or a Unix socket's (unix://), else None
        (rediss://): redis-py serves those."""
        opts = parse_url(url)
        unix = opts.get("connection_class") is UnixDomainSocketConnection
        if "connection_class" in opts and not unix:
            return None
        return cls(opts.get("host", "localhost"), int(opts.get("port", 6379)),
                   timeout_s=timeout_s, password=opts.get("password"),
                   username=opts.get("username"), db=int(opts.get("db", 0)),
                   on_connect=on_connect, on_lost=on_lost,
                   path=opts["path"] if unix else None)

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Each command's reply, in order; an error reply is returned in its place (as
        redis-py's class for it). Raises ConnectionError or TimeoutError for the batch."""
        if not commands:  # no reply would ever resolve it
            return []
        link = self._link
        if link is None or link.lost is not None:
            link = await self._connect()
        future: asyncio.Future[list[Any]] = link.send(commands)
        self._arm_watchdog()
        return await future

    def send_now(self, commands: Sequence[Command], finish: Finish) -> asyncio.Future[Any] | None:
        """`commands` written now, without awaiting anything, on the connection that is up; a
        future of `finish` of their replies (errors as in `execute`). None when no connection
        is up: then `execute`, which connects, is the way."""
        link = self._link
        if link is None or link.lost is not None or not commands:
            return None
        future = link.send(commands, finish)
        self._arm_watchdog()
        return future

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self.timeout_s / 4,
                                                                   self._watch)

    async def run(self, link: _Link, *command: str | bytes | int) -> Any:
        """One command on `link` (for `on_connect`, before the link serves anyone)."""
        (reply,) = await asyncio.wait_for(link.send([command]), self.timeout_s)
        if isinstance(reply, redis.exceptions.RedisError):
            raise reply
        return reply

    def _watch(self) -> None:
        """Fail the link whose oldest batch has waited past the timeout: one timer a quarter
        of the timeout apart while batches wait, rather than one timer a batch."""
        self._watchdog = None
        link = self._link
        if link is None or not link.batches:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - link.batches[0].sent_at > self.timeout_s:
            link.fail(redis.exceptions.TimeoutError(
                f"redis sent no reply within {self.timeout_s:g} s"))
            return
        self._watchdog = loop.call_later(self.timeout_s / 4, self._watch)

    async def _connect(self) -> _Link:
        # one connection attempt at a time; the batches that come meanwhile wait for it
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Link:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.path is not None:
                    _, link = await loop.create_unix_connection(
                        lambda: _Link(self.on_lost), self.path)
                else:
                    _, link = await loop.create_connection(lambda: _Link(self.on_lost),
                                                           self.host, self.port)
        except (OSError, TimeoutError) as exc:
            where = self.path or f"{self.host}:{self.port}"
            raise redis.exceptions.ConnectionError(
                f"cannot connect to redis at {where}: {exc}") from exc
        try:
            if self.password is not None:
                auth = [self.username, self.password] if self.username else [self.password]
                await self.run(link, "AUTH", *auth)
            if self.db:
                await self.run(link, "SELECT", self.db)
            if self.on_connect is not None:
                await self.on_connect(self, link)
        except TimeoutError as exc:
            error = redis.exceptions.TimeoutError("redis did not answer the handshake")
            link.fail(error)
            raise error from exc
        except BaseException as exc:
            link.fail(redis.exceptions.ConnectionError(f"redis handshake failed: {exc}"))
            raise
        self.connects += 1
        self._link = link
        return link

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._link is not None:
            self._link.fail(redis.exceptions.ConnectionError("redis connection closed"))
            self._link = None


async def pipeline(client: Any, mux: RedisMux | None, commands: Sequence[Command]) -> list[Any]:
    """The replies to `commands` in order, an error reply in its place: over `mux` when there
    is one, else as one redis-py pipeline of `client` (which routes each command by its keys on
    a cluster). HGETALL's reply is a dict either way, as redis-py makes it."""
    if mux is None:
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                # execute_command, not pipe.evalsha: redis-py refuses that name in a cluster
                # pipeline, though the command itself is routed by its keys like any other
                pipe.execute_command(*command)
            out: list[Any] = await pipe.execute(raise_on_error=False)
        return out
    out = await mux.execute(commands)
    for i, command in enumerate(commands):
        if command[0] == "HGETALL" and isinstance(out[i], list):
            pairs = iter(out[i])
            out[i] = dict(zip(pairs, pairs, strict=True))
    return out
