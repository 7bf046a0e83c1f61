"""Lanes of grouped transactions: calls that arrive while a group is in Postgres wait and go
together in the next one (group commit). Shared by the reservation committer (group_commit) and
the committer of Commit/Release (group_settle).

A group goes to Postgres as soon as no other is there; while one is, arriving calls queue and go
together in the next. At low load a group is one call; under load, groups grow with it. A second
group (up to `lanes`) goes only when every group in Postgres has been there for `stall_s`: one
that waits on a row lock (a bulk import holding it, say) does not hold up the calls behind it for
longer than that. That second group takes only calls that lock none of the rows of the groups in
Postgres: the others would wait in Postgres for the same lock, and on a row every call wants (a
flash sale's) each extra group would queue behind the one before it, every call waiting for all
of them, where one group at a time takes the calls that arrived while it waited.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Generic, TypeVar

from inventory_svc.domain.errors import Aborted, DeadlineExceeded, DomainError, Unavailable

log = logging.getLogger(__name__)

C = TypeVar("C")


def group_failure(exc: BaseException, *, sent: bool, what: str) -> DomainError:
    """What every call of a group that failed hears. Before its COMMIT was sent nothing was
    confirmed (UNAVAILABLE, or ABORTED: retry); once it was, the outcome is unknown
    (DEADLINE_EXCEEDED: retry with the same key to learn it). Unexpected errors are logged."""
    if isinstance(exc, TimeoutError):
        why = "postgres did not commit in time; retry"
    elif isinstance(exc, Unavailable | Aborted):
        why = exc.message
    else:
        log.error("%s failed", what, exc_info=exc)
        why = f"the commit failed: {exc!r}; retry"
    if isinstance(exc, Aborted):
        return Aborted(why)
    if sent:
        return DeadlineExceeded("postgres did not confirm the commit: its outcome is unknown; "
                                "retry with the same idempotency_key to learn it")
    return Unavailable(why)


class Lanes(ABC, Generic[C]):
    """Queues calls and runs them in groups, at most `lanes` groups at once."""

    def __init__(self, *, max_group: int, lanes: int, stall_s: float, name: str) -> None:
        self.max_group = max_group
        self.lanes = lanes
        self.stall_s = stall_s
        self.name = name
        self._queue: list[C] = []
        # a group in flight: when it started, and its calls
        self._groups: dict[asyncio.Task[None], tuple[float, list[C]]] = {}
        self._stall_timer: asyncio.TimerHandle | None = None
        self._calls_in_flight = 0
        self.groups = 0  # committed groups, the calls in them and the largest, for metrics
        self.calls = 0
        self.largest = 0

    @property
    def queued(self) -> int:
        """Calls waiting for a group."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Groups in Postgres."""
        return len(self._groups)

    @property
    def calls_in_flight(self) -> int:
        """Calls in the groups in Postgres."""
        return self._calls_in_flight

    @abstractmethod
    def conflicts(self, call: C) -> Iterable[str]:
        """What two calls of one group must not share (an idempotency key, a reservation): the
        second must see the first's outcome, which one transaction would not show it."""

    def rows(self, call: C) -> Iterable[object]:
        """The rows the call's group locks for it (none known: the call may go in any lane)."""
        return ()

    @abstractmethod
    async def run_group(self, group: list[C]) -> None:
        """Run one group to its end; every call of it is answered, nothing escapes."""

    def submit(self, call: C) -> None:
        self._queue.append(call)
        self._start_groups()

    def withdraw(self, call: C) -> bool:
        """Take back a call not yet sent; False once it is in a group."""
        if call in self._queue:
            self._queue.remove(call)
            return True
        return False

    def counted(self, size: int) -> None:
        self.groups += 1
        self.calls += size
        self.largest = max(self.largest, size)

    async def close(self) -> None:
        """Let the groups in flight finish (their calls were sent to Postgres)."""
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        while self._groups:
            await asyncio.gather(*self._groups, return_exceptions=True)
        if self.groups:
            log.debug("%s: %d calls in %d groups, %.2f a group, the largest %d", self.name,
                      self.calls, self.groups, self.calls / self.groups, self.largest)

    def _start_groups(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue and self._lane_free(loop.time()):
            group = self._next_group()
            # Every queued call wants a row of a group in flight. That group's end, or a call
            # that can go, comes back here (_group_done, submit): no timer is needed for it.
            if not group:
                break
            task = asyncio.create_task(self.run_group(group))
            self._groups[task] = (loop.time(), group)
            self._calls_in_flight += len(group)
            task.add_done_callback(self._group_done)
        if self._queue and len(self._groups) < self.lanes and self._stall_timer is None and \
                not self._lane_free(loop.time()):
            self._stall_timer = loop.call_at(
                max(started for started, _ in self._groups.values()) + self.stall_s,
                self._stalled)

    def _next_group(self) -> list[C]:
        """The queued calls the next group takes, in arrival order; the rest stay queued."""
        locked = {row for _, calls in self._groups.values() for call in calls
                  for row in self.rows(call)}
        group: list[C] = []
        taken: set[str] = set()
        rest: list[C] = []
        for call in self._queue:
            mine = set(self.conflicts(call))
            if len(group) >= self.max_group or mine & taken or \
                    (locked and not locked.isdisjoint(self.rows(call))):
                rest.append(call)
                continue
            group.append(call)
            taken |= mine
        self._queue = rest
        return group

    def _lane_free(self, now: float) -> bool:
        return not self._groups or (len(self._groups) < self.lanes and all(
            now - started >= self.stall_s for started, _ in self._groups.values()))

    def _stalled(self) -> None:
        self._stall_timer = None
        self._start_groups()

    def _group_done(self, task: asyncio.Task[None]) -> None:
        _, group = self._groups.pop(task)
        self._calls_in_flight -= len(group)
        self._start_groups()
