"""Auto-pipelined scripts (storage/script_pipe.py) against a real Redis: concurrent calls share a
round trip, and each hears only its own scripts' results and errors."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from inventory_svc.storage.redis_mux import RedisMux
from inventory_svc.storage.script_pipe import ScriptPipe
from tests.conftest import Stores, uid


@pytest.mark.parametrize("transport", ["redis-py", "mux"])
async def test_calls_of_one_loop_turn_share_a_round_trip_and_keep_their_own_answers(
    stores: Stores, transport: str,
) -> None:
    client = aioredis.Redis.from_url(stores.redis_url)
    mux = RedisMux.for_url(stores.redis_url, timeout_s=10) if transport == "mux" else None
    try:
        incr = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        fail = client.register_script("return redis.error_reply('refused: ' .. ARGV[1])")
        await client.script_flush()  # the first round trip meets NOSCRIPT and reloads
        pipe = ScriptPipe(client, mux)
        key = uid("counter")

        async def add(n: int) -> int:
            (total,) = await pipe.run([(incr, [key], [n])])
            return int(total)

        async def two(n: int) -> list[int]:
            return [int(x) for x in await pipe.run([(incr, [key], [n]), (incr, [key], [n])])]

        async def refused() -> str:
            with pytest.raises(redis.exceptions.ResponseError) as err:
                await pipe.run([(incr, [key], [1000]), (fail, [key], ["x"])])
            return str(err.value)

        answers = await asyncio.gather(*(add(1) for _ in range(40)), two(100), refused())
        assert pipe.round_trips == 2, "one pipeline, sent again after loading the scripts"
        singles, pair, error = answers[:40], answers[40], answers[41]
        assert "refused: x" in error
        # every INCRBY ran once, in the order the calls were made
        assert singles == list(range(1, 41))
        assert pair == [140, 240]
        assert int(await client.get(key)) == 40 + 200 + 1000

        assert await add(1) == 1241
        assert pipe.round_trips == 3, "a call alone is a round trip of its own"
    finally:
        if mux is not None:
            await mux.aclose()
        await client.aclose()


async def test_scripts_redis_lost_while_connected_run_once_each_when_sent_again(
    stores: Stores,
) -> None:
    """Over a connected mux a turn's pipeline is written at once, without checking the scripts:
    after Redis loses them (SCRIPT FLUSH, a restart) each caller sends again only its scripts
    that met NOSCRIPT, so none runs twice, including a caller whose other script did run."""
    client = aioredis.Redis.from_url(stores.redis_url)
    mux = RedisMux.for_url(stores.redis_url, timeout_s=10)
    assert mux is not None
    try:
        incr = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        append = client.register_script("return redis.call('APPEND', KEYS[1], ARGV[1])")
        pipe = ScriptPipe(client, mux)
        key, text = uid("counter"), uid("text")
        await pipe.run([(incr, [key], [1]), (append, [text], ["a"])])  # connected, both loaded
        sent = pipe.round_trips

        await client.script_flush()
        await client.script_load(incr.script)  # Redis has one of the two again

        async def both(n: int) -> list[int]:
            return [int(x) for x in await pipe.run([(incr, [key], [n]), (append, [text], ["b"])])]

        async def add(n: int) -> int:
            (total,) = await pipe.run([(incr, [key], [n])])
            return int(total)

        pair, single = await asyncio.gather(both(10), add(100))
        assert pair[0] == 11 and single == 111, "INCRBY ran once each, in call order"
        assert int(await client.get(key)) == 111
        assert await client.get(text) == b"ab", "APPEND ran once after its NOSCRIPT"
        assert pipe.round_trips == sent + 2, "the turn's pipeline, then the one script again"
    finally:
        await mux.aclose()
        await client.aclose()
