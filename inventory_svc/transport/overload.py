"""Overload signals for admission: how far the event loop runs behind (LoopLag), and whether the
calls of a method queue faster than the service answers them (StandingQueue).

The two see different queues. A stalled loop (a long GC, a blocking call) makes every call wait
at once, and LoopLag sees it within a tick. A load above what the service can do does not stall
the loop: each turn stays short, but calls pile up between turns, inside the service (waiting
for a group commit, for a Redis pipeline) and in grpc's queue before it. Measured at 1.5x the
maximum Reserve rate (benchmarks/RESULTS.md), the loop ran at most 20-120 ms late while a call's
own time in the service grew to 0.1-0.8 s, ~1,000 calls in flight in one process. StandingQueue
sees that: it is CoDel's test (Nichols and Jacobson, "Controlling Queue Delay", 2012), applied to
the time between admitting a call and answering it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class LoopLag:
    """How far behind the event loop runs: the time a call that arrives now waits before it is
    worked on. A tick is scheduled every `interval_s`; the lag is how late a tick ran, or how
    overdue the next one is, whichever is larger (so a loop stuck right now shows it before the
    tick gets to run).

    A tick `late` seconds late is remembered for as long again (at most `memory_s`): the calls
    that arrived during the stall wait in grpc's queue and are worked off first, so the calls
    behind them wait about as long (longer on a busy loop), while the ticks between them already
    run on time. Without it, only the calls looked at before the next tick saw the stall, and on
    a busy box none might be."""

    def __init__(self, interval_s: float = 0.01, memory_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.memory_s = memory_s
        self._late = 0.0
        self._late_until = 0.0
        self._due = math.inf

    def lag(self) -> float:
        if self._due == math.inf:
            return 0.0
        now = time.monotonic()
        return max(self._late if now < self._late_until else 0.0, now - self._due)

    async def run(self) -> None:
        while True:
            self._due = time.monotonic() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            late = max(0.0, now - self._due)
            if late >= self._late or now >= self._late_until:
                self._late, self._late_until = late, now + min(late, self.memory_s)


class StandingQueue:
    """Whether one method's calls queue in the service, and how many of them may be in flight.

    Every `interval_s` it looks at the calls of the method that were answered OK in that time.
    If even the quickest of them took longer than `budget_s`, the wait is not a burst draining
    but a queue that stands: calls arrive faster than they are answered. From then on a new call
    is admitted only while fewer calls of the method are in flight than the service answers in
    `budget_s` at the rate it answered them in the last interval (Little's law: that many wait
    about `budget_s`). The others are refused at once, before their request is read, which costs
    the service far less than serving them would; so the loop keeps up with the arrivals and the
    calls it accepts keep their latency.

    The limit follows the service: a call answered in less than the budget raises it, one in more
    lowers it. It is lifted after an interval in which no call needed refusing (the arrivals fit
    under it again), and never goes below `floor`, so a few calls always get in."""

    __slots__ = ("budget_s", "completed", "floor", "in_flight", "interval_s", "limit", "quickest",
                 "refused", "window_end")

    def __init__(self, budget_s: float, *, interval_s: float = 0.1, floor: int = 4) -> None:
        self.budget_s = budget_s
        self.interval_s = interval_s
        self.floor = floor
        self.in_flight = 0
        self.limit = math.inf  # calls of the method that may be in flight
        self.completed = 0  # calls answered (any way) in this interval
        self.quickest = math.inf  # the shortest time a call answered OK took, this interval
        self.refused = 0  # calls refused in this interval
        self.window_end = time.monotonic() + interval_s

    def admits(self, now: float) -> bool:
        """Whether a call arriving `now` may go in (the caller counts it in `in_flight`)."""
        if now >= self.window_end:
            self._next_interval(now)
        if self.in_flight < self.limit:
            return True
        self.refused += 1
        return False

    def answered(self, took_s: float, ok: bool, now: float) -> None:
        """A call admitted `took_s` ago was answered (`ok`: not by an error)."""
        self.in_flight -= 1
        self.completed += 1
        if ok and took_s < self.quickest:
            self.quickest = took_s
        if now >= self.window_end:
            self._next_interval(now)

    def retry_after_s(self) -> float:
        """What a refused call is told: the budget, the time the calls admitted take to drain
        (at least 50 ms, at most 1 s, in whole 10 ms: refusals are a few cached handlers)."""
        return min(1.0, max(0.05, math.ceil(self.budget_s * 100) / 100))

    def _next_interval(self, now: float) -> None:
        elapsed = now - (self.window_end - self.interval_s)
        if self.quickest > self.budget_s and self.quickest != math.inf:
            self._limit_to(self.completed / elapsed)
        elif self.limit != math.inf:
            if self.refused == 0:
                self.limit = math.inf  # the arrivals fit under it: the queue is gone
            elif self.completed:
                self._limit_to(self.completed / elapsed)
        # (no call answered OK: nothing to judge by; the state stays as it was)
        self.completed = self.refused = 0
        self.quickest = math.inf
        self.window_end = now + self.interval_s

    def _limit_to(self, answered_per_s: float) -> None:
        # (rounded first: 80 calls in 0.1 s at a 50 ms budget is 40, not 41 by float error)
        self.limit = max(self.floor, math.ceil(round(answered_per_s * self.budget_s, 6)))


class ArrivalProbe:
    """The wait of a call arriving now, measured end to end: every `interval_s` while calls
    come, the service calls its own health check and times the answer. The probe queues where
    callers queue: in the kernel and in grpc's list of calls not yet taken, behind every call
    that came before it, then for the loop. LoopLag sees the loop only, StandingQueue the calls
    taken; in an overload whose backlog is in grpc's list, neither sees it (benchmarks/RESULTS.md).

    Half the probe's time is taken as a caller's wait: the probe also passes through the loop
    twice more than a caller waits for (the call sent, the answer read). Admission refuses every
    new call while that wait is over the budget, which drains the backlog (a refusal costs far
    less than a call served) until a probe gets through in time again. (Refusing a share of the
    calls instead, moved after each probe by how far it was from the budget, refused more and
    kept a longer tail: the refusals themselves kept the loop busy, so the share only rose.)

    It calls through a Unix socket of its own, in a directory only the service's OS user may
    enter: with `serve --workers N` each worker measures its own queue (the TCP port is shared),
    and nobody else reaches the service there, past the port's TLS."""

    def __init__(self, server: grpc.aio.Server, *, interval_s: float = 0.025,
                 timeout_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.busy = False  # a call came since the last probe (set by admission)
        self.rounds = 0  # probes answered
        self._last = 0.0
        self._sent = math.inf
        self._dir = tempfile.mkdtemp(prefix="inventory-svc-")  # mode 0700
        self.address = f"unix:{self._dir}/probe.sock"
        server.add_insecure_port(self.address)  # (before the server starts)

    def wait(self) -> float:
        """A caller's wait as the last probe saw it, or as the probe in flight sees it so far."""
        return max(self._last, time.monotonic() - self._sent) / 2

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest()
            while True:
                await asyncio.sleep(self.interval_s)
                if not self.busy:  # no calls, no queue: an idle service does not probe
                    self._last = 0.0
                    continue
                self.busy = False
                self._sent = time.monotonic()
                with contextlib.suppress(grpc.RpcError):  # any answer is a round trip
                    await check(request, timeout=self.timeout_s)
                self._last, self._sent = time.monotonic() - self._sent, math.inf
                self.rounds += 1

    def remove_socket(self) -> None:
        """Remove the socket's directory (once the server has stopped)."""
        shutil.rmtree(self._dir, ignore_errors=True)
