"""The batching rule under the script pipe and the replay lookups (storage/coalesce.py)."""

from __future__ import annotations

import asyncio

import pytest

from inventory_svc.storage.coalesce import Coalescer


class Store:
    """Answers each batch with its items doubled, an odd item with an error for it alone; a
    batch waits until the test lets it through."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.sent = asyncio.Event()

    async def send(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        self.sent.set()
        await self.gate.wait()
        return [ValueError(f"odd {x}") if x % 2 else 2 * x for x in items]


async def test_calls_made_while_a_request_is_out_go_together_in_the_next() -> None:
    store = Store()
    turns = Coalescer(store.send, max_in_flight=1)
    first = [asyncio.ensure_future(turns.run(x)) for x in (2, 4)]
    await store.sent.wait()  # the first batch is out, and held there
    later = [asyncio.ensure_future(turns.run(x)) for x in (6, 7, 8)]
    for _ in range(10):  # many turns of the loop: nothing more goes while one is out
        await asyncio.sleep(0)
    assert store.batches == [[2, 4]]
    store.gate.set()
    assert await asyncio.gather(*first) == [4, 8]
    assert await later[0] == 12 and await later[2] == 16
    with pytest.raises(ValueError, match="odd 7"):
        await later[1]
    assert store.batches == [[2, 4], [6, 7, 8]]
    assert turns.sends == 2


async def test_without_a_limit_each_turn_goes_at_once() -> None:
    store = Store()
    store.gate.set()
    turns = Coalescer(store.send)
    assert await asyncio.gather(*(turns.run(x) for x in (2, 4))) == [4, 8]
    assert await turns.run(10) == 20
    assert store.batches == [[2, 4], [10]]
