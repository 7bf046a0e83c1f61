"""The hot path's pipelined Redis connection (storage/redis_mux.py) against a real Redis, and
through a TCP proxy that holds, cuts and resets it: every caller gets its own replies, in order,
and a lost or silent connection fails the batches in flight and is made again for the next."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import stat
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.exceptions

from inventory_svc.embedded import EmbeddedRedis
from inventory_svc.storage.redis_mux import RedisMux
from tests.conftest import Stores, uid
from tests.faults.harness import port_of, with_port
from tests.faults.tcp_proxy import TcpProxy


def _proxy_to(url: str) -> TcpProxy:
    """A TCP proxy in front of the Redis at `url` (its clients use with_port(url, proxy.port))."""
    return TcpProxy(urlsplit(url).hostname or "127.0.0.1", port_of(url))


def _mux(url: str, timeout_s: float = 5.0) -> RedisMux:
    mux = RedisMux.for_url(url, timeout_s=timeout_s)
    assert mux is not None
    return mux


async def test_concurrent_batches_each_get_their_own_replies_in_order(stores: Stores) -> None:
    mux = _mux(stores.redis_url)
    key, text = uid("mux-counter"), uid("mux-text")
    try:
        async def batch(n: int) -> list[object]:
            return await mux.execute([("INCRBY", key, n), ("ECHO", f"call {n}"),
                                      ("HGET", text, "f")])

        await mux.execute([("SET", text, "not a hash")])
        answers = await asyncio.gather(*(batch(n) for n in range(1, 201)))
        for n, (total, echo, wrong) in enumerate(answers, start=1):
            assert echo == f"call {n}".encode()
            # an error reply stands in its command's place, as redis-py's class for its code
            assert isinstance(wrong, redis.exceptions.ResponseError)
            assert "WRONGTYPE" in str(wrong)
            assert isinstance(total, int)
        # every INCRBY ran once, in the order the batches were made
        assert [a[0] for a in answers] == [n * (n + 1) // 2 for n in range(1, 201)]
        assert await mux.execute([]) == []
        (missing,) = await mux.execute([("EVALSHA", "0" * 40, 0)])
        assert isinstance(missing, redis.exceptions.NoScriptError)
        assert mux.connects == 1, "one connection serves every caller"
    finally:
        await mux.aclose()


async def test_a_reset_connection_fails_the_batches_in_flight_and_the_next_one_reconnects(
    stores: Stores,
) -> None:
    with _proxy_to(stores.redis_url) as proxy:
        mux = _mux(with_port(stores.redis_url, proxy.port))
        key = uid("mux-reset")
        try:
            assert await mux.execute([("SET", key, "1")]) == [b"OK"]
            proxy.blackhole()  # the next batch is held on its way
            held = asyncio.ensure_future(mux.execute([("INCR", key)]))
            await asyncio.sleep(0)  # let it be written
            assert not held.done()
            assert proxy.reset() == 1
            with pytest.raises(redis.exceptions.ConnectionError):
                await held
            proxy.heal()
            (value,) = await mux.execute([("GET", key)])
            assert value in (b"1", b"2")  # the held INCR may or may not have reached Redis
            assert mux.connects == 2
        finally:
            await mux.aclose()


async def test_a_silent_connection_times_out_and_is_replaced(stores: Stores) -> None:
    with _proxy_to(stores.redis_url) as proxy:
        mux = _mux(with_port(stores.redis_url, proxy.port), timeout_s=0.5)
        try:
            assert await mux.execute([("PING",)]) == [b"PONG"]
            proxy.blackhole()
            first = asyncio.ensure_future(mux.execute([("ECHO", "a")]))
            second = asyncio.ensure_future(mux.execute([("ECHO", "b")]))
            for batch in (first, second):  # the watchdog fails the link with every batch on it
                with pytest.raises(redis.exceptions.TimeoutError):
                    await batch
            proxy.heal()
            assert await mux.execute([("ECHO", "c")]) == [b"c"]
            assert mux.connects == 2
        finally:
            await mux.aclose()


async def test_a_wrong_password_is_a_connection_error(stores: Stores) -> None:
    parts = urlsplit(stores.redis_url)
    if not parts.password:
        pytest.fail("the test Redis has no password: this test needs one")
    wrong = urlunsplit(parts._replace(netloc=f":not-{parts.password}@{parts.hostname}:"
                                             f"{parts.port}"))
    mux = _mux(wrong)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            await mux.execute([("PING",)])
        assert mux.connects == 0
    finally:
        await mux.aclose()


async def test_the_run_check_runs_on_every_new_connection(stores: Stores) -> None:
    seen: list[bytes] = []

    async def on_connect(mux: RedisMux, link: object) -> None:
        info = await mux.run(link, "INFO", "server")  # type: ignore[arg-type]
        seen.append(info)

    with _proxy_to(stores.redis_url) as proxy:
        mux = RedisMux.for_url(with_port(stores.redis_url, proxy.port), timeout_s=5,
                               on_connect=on_connect)
        assert mux is not None
        try:
            await mux.execute([("PING",)])
            proxy.blackhole()
            held = asyncio.ensure_future(mux.execute([("PING",)]))
            await asyncio.sleep(0)  # let it be written
            proxy.reset()
            with pytest.raises(redis.exceptions.ConnectionError):
                await held
            proxy.heal()
            assert await mux.execute([("PING",)]) == [b"PONG"]
            assert len(seen) == 2 and all(b"run_id:" in info for info in seen)
        finally:
            await mux.aclose()


def test_plain_tcp_and_unix_socket_urls_get_a_mux_tls_does_not() -> None:
    tcp = RedisMux.for_url("redis://:pw@127.0.0.1:6390/2", timeout_s=1)
    assert tcp is not None and (tcp.host, tcp.port, tcp.db, tcp.path) == ("127.0.0.1", 6390, 2, None)
    unix = RedisMux.for_url("unix://:pw@/tmp/a%20dir/redis.sock?db=1", timeout_s=1)
    assert unix is not None and (unix.path, unix.db, unix.password) == (
        "/tmp/a dir/redis.sock", 1, "pw")
    assert RedisMux.for_url("rediss://u:p@example.com:6390/0", timeout_s=1) is None


async def test_a_unix_socket_mux_serves_and_reconnects_after_its_server_restarts() -> None:
    """The embedded server's local URL is its Unix socket (0700, in its 0700 dir): the mux
    speaks over it, and a server that went away and came back is connected to again."""
    root = Path(tempfile.mkdtemp(prefix="mux-"))  # short: a socket's path has a length limit
    server = EmbeddedRedis(root / "redis", durable=False)
    server.start()
    try:
        assert server.socket_path is not None
        assert server.local_url.startswith("unix://")
        assert stat.S_IMODE(server.socket_path.stat().st_mode) & 0o077 == 0
        mux = _mux(server.local_url)
        try:
            assert await mux.execute([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]
            server.restart()
            # a batch written to the old connection fails; the next one connects again
            with contextlib.suppress(redis.exceptions.ConnectionError):
                await mux.execute([("GET", "k")])
            assert await mux.execute([("PING",)]) == [b"PONG"]
            assert mux.connects == 2
        finally:
            await mux.aclose()
        wrong = _mux(server.local_url.replace(server.password, "not-the-password"))
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                await wrong.execute([("PING",)])
        finally:
            await wrong.aclose()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_a_data_dir_too_deep_for_a_socket_path_serves_over_tcp(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / ("d" * 60) / ("e" * 60), durable=False)
    assert server.socket_path is None
    server.start()
    try:
        assert server.local_url == server.url and server.url.startswith("redis://")
        mux = _mux(server.local_url)
        try:
            assert await mux.execute([("PING",)]) == [b"PONG"]
        finally:
            await mux.aclose()
    finally:
        server.stop()
