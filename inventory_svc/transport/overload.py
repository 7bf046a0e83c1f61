"""Overload signals for admission: how far the event loop runs behind (LoopLag), and how long a
call arriving now waits before the service takes it (ArrivalProbe).

They see different queues. A stalled loop (a long GC, a blocking call) makes every call wait at
once, and LoopLag sees it within a tick. A load above what the service can do does not stall the
loop: each turn stays short, while the calls pile up in grpc's list of calls not yet taken.
Measured at 1.5x the maximum Reserve rate (benchmarks/RESULTS.md), the loop ran at most 20-120 ms
late while calls waited 0.2-1.6 s before the service took them; only a call that waits in that
list itself, the probe, sees it.
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


class ArrivalProbe:
    """The wait of a call arriving now, measured end to end: every `interval_s` while calls
    come, the service calls its own health check and times the answer. The probe queues where
    callers queue: in the kernel and in grpc's list of calls not yet taken, behind every call
    that came before it, then for the loop.

    Half the probe's time is taken as a caller's wait: the probe also passes through the loop
    twice more than a caller waits for (the call sent, the answer read). Admission refuses every
    new call while that wait is over the budget; refusals are cheap next to served calls, so the
    backlog drains, and the next probe that gets through in time opens the door again. `wait()`
    is the last probe's time, or the time of the probe in flight if that is longer: a backlog
    shows while the probe is still in it.

    Tried and not kept (benchmarks/RESULTS.md): refusing a share of the calls, moved after each
    probe by how far it was from the budget (the refusals kept the loop busy, so the share only
    rose); and limiting each method's calls in flight to what it answered within the budget, by
    CoDel's test on their time in the service (the calls' time there grew with the loop's work
    on refusals, not with their number, so the limit fell to its floor: 93-97 % refused).

    It calls through a Unix socket of its own, in a directory only the service's OS user may
    enter: with `serve --workers N` each worker measures its own queue (the TCP port is shared),
    and nobody else reaches the service there, past the port's TLS."""

    def __init__(self, *, interval_s: float = 0.025, timeout_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.busy = False  # a call came since the last probe (set by admission)
        self.rounds = 0  # probes answered
        self._last = 0.0
        self._sent = math.inf
        self._dir = tempfile.mkdtemp(prefix="inventory-svc-")  # mode 0700
        self.address = f"unix:{self._dir}/probe.sock"  # the server listens there too

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
        """Remove the socket's directory (once the server has stopped, or failed to start)."""
        shutil.rmtree(self._dir, ignore_errors=True)
