"""Background loops that end when cancelled, on Python 3.11 too.

Python 3.11's asyncio.wait_for returns its inner result instead of raising when the cancel lands
in the loop turn in which that inner task finished (CPython gh-86296, fixed in 3.12), and
redis-py sends every command through one. A loop that went on after such a step would sleep out
its interval (the reconciler's: 30 s, an hour in the tests) and the shutdown, waiting for it,
with it. Task.cancelling() still counts the request: these helpers honour it.
"""

from __future__ import annotations

import asyncio


def stop_if_cancelled() -> None:
    """Raise CancelledError when this task was cancelled but an await swallowed the cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def nap(delay_s: float) -> None:
    """asyncio.sleep for the background loops: a cancel an earlier await swallowed ends the
    loop here (stop_if_cancelled) rather than after the nap."""
    stop_if_cancelled()
    await asyncio.sleep(delay_s)
