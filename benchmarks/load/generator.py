"""The multi-process load generator.

Worker processes are started with the "spawn" context (never a fork of a process with gRPC
running), each with its own asyncio loop and a few grpc.aio channels. The coordinator sends each a
`Plan` (its share of the rate or the users), the workers report running counters every second for
the progress line and their merged-able `PhaseStats` at the end of the phase.

- open loop: a worker schedules arrivals at fixed (or Poisson) intended times and times each
  operation from its intended start, so a stall is latency, not missing samples (no coordinated
  omission); arrivals beyond `max_outstanding` in flight are shed and counted;
- closed loop: N virtual users back to back, optionally with an exponential think time and a ramp.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Any

from benchmarks.load.stats import PhaseStats


@dataclass
class Plan:
    """One phase. `rate` and `users` are totals; each worker runs its share."""

    label: str
    scenario: str
    mode: str  # "open" or "closed"
    rate: float = 0.0  # open loop: operations per second
    users: int = 0  # closed loop: concurrent virtual users
    think_s: float = 0.0  # closed loop: mean exponential pause between a user's operations
    ramp_s: float = 0.0  # closed loop: users start uniformly within this many seconds
    duration_s: float = 5.0
    warmup_s: float = 1.0
    drain_s: float = 3.0
    max_outstanding: int = 1000  # open loop, per worker
    poisson: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    target: str = ""  # the service this phase drives ("": the pool's own target)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -------------------------------------------------------------------------------------------------
# worker side


def worker_main(wid: int, init: dict[str, Any], cmd_q: Any, out_q: Any) -> None:
    """Entry point of a worker process."""
    if init.get("uvloop", True):
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
    try:
        asyncio.run(_worker(wid, init, cmd_q, out_q))
    except Exception:
        out_q.put(("error", wid, traceback.format_exc()))


async def _worker(wid: int, init: dict[str, Any], cmd_q: Any, out_q: Any) -> None:
    from benchmarks.load.anchors import ANCHOR_SCENARIOS
    from benchmarks.load.clients import Clients
    from benchmarks.load.scenarios import SCENARIOS, Env

    registry = {**SCENARIOS, **ANCHOR_SCENARIOS}
    clients = Clients(init["channels"])
    env = Env(wid, init["run_id"], init["seed"], init["universe"], init["knobs"], clients,
              init["target"])
    loop = asyncio.get_running_loop()
    out_q.put(("ready", wid, None))
    try:
        while True:
            plan: Plan | None = await loop.run_in_executor(None, cmd_q.get)
            if plan is None:
                return
            try:
                env.target = plan.target or init["target"]
                scenario = registry[plan.scenario](env, plan.params)
                await scenario.setup()
                try:
                    stats = await _run_phase(wid, plan, scenario, env, out_q)
                finally:
                    await scenario.close()
                out_q.put(("result", wid, stats.to_dict()))
            except Exception:
                out_q.put(("error", wid, traceback.format_exc()))
    finally:
        await clients.close()


async def _run_phase(wid: int, plan: Plan, scenario: Any, env: Any, out_q: Any) -> PhaseStats:
    from benchmarks.load.clients import Counters, Recorder

    stats, counters = PhaseStats(), Counters()
    t_start = perf_counter() + 0.01
    t_rec = t_start + plan.warmup_s
    t_end = t_rec + plan.duration_s
    live = Recorder(stats, counters, t_rec, t_end, env.knobs.timeout_s)
    warm = Recorder(None, counters, t_rec, t_end, env.knobs.timeout_s)
    stats.t0_wall = time.time() + (t_rec - perf_counter())
    tasks: set[asyncio.Task[None]] = set()
    cpu0, wall0 = _cpu_s(), perf_counter()

    async def run_op(t0: float) -> None:
        # (event-loop timers have ms granularity and may fire a little early: with no warm-up,
        # decide by the plan, not by comparing clocks)
        measured = plan.warmup_s <= 0 or t0 >= t_rec
        try:
            await scenario.op(live if measured else warm, t0)
        except Exception as exc:  # a bug in a scenario must show, not stop the phase
            stats.client_errors[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
            return
        stats.all_ops += 1
        if measured and perf_counter() <= t_end:
            stats.ops += 1

    def spawn(coro: Any) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def report() -> None:
        while True:
            counters.inflight = len(tasks)
            out_q.put(("progress", wid, (counters.calls, counters.errors, counters.shed,
                                         counters.inflight)))
            await asyncio.sleep(1.0)

    reporter = asyncio.create_task(report())
    rng = env.rng
    if plan.mode == "open":
        if plan.rate > 0:
            interval = 1.0 / plan.rate
            nxt = t_start + rng.random() * interval
            while nxt < t_end:
                now = perf_counter()
                if nxt > now:
                    await asyncio.sleep(nxt - now)
                    continue
                while nxt <= now and nxt < t_end:  # fire everything due, each at its own time
                    if len(tasks) >= plan.max_outstanding:
                        counters.shed += 1
                        stats.shed += nxt >= t_rec
                    else:
                        spawn(run_op(nxt))
                    nxt += rng.expovariate(plan.rate) if plan.poisson else interval
        else:
            await asyncio.sleep(max(0.0, t_end - perf_counter()))
    else:
        async def user() -> None:
            # nothing starts before t_start: with no warm-up every operation must be counted
            ramp = rng.uniform(0.0, plan.ramp_s) if plan.ramp_s > 0 else 0.0
            await asyncio.sleep(max(0.0, t_start - perf_counter()) + ramp)
            while (now := perf_counter()) < t_end:
                await run_op(now)
                if plan.think_s > 0:
                    pause = rng.expovariate(1.0 / plan.think_s)
                    await asyncio.sleep(min(pause, max(0.0, t_end - perf_counter())))

        for _ in range(plan.users):
            spawn(user())
        await asyncio.sleep(max(0.0, t_end - perf_counter()))
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=plan.drain_s)
        for task in pending:
            task.cancel()
        stats.unfinished += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    reporter.cancel()
    stats.cpu_s = _cpu_s() - cpu0
    stats.wall_s = perf_counter() - wall0
    stats.window_s = plan.duration_s
    return stats


# -------------------------------------------------------------------------------------------------
# coordinator side


def _share(total: int, wid: int, n: int) -> int:
    return total // n + (1 if wid < total % n else 0)


class WorkerPool:
    """N spawned worker processes, kept for the whole run; `run` executes one phase on all."""

    def __init__(self, n: int, init: dict[str, Any], *, progress: bool = True,
                 start_timeout_s: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        self.n = n
        self.progress = progress
        self._last_log = 0.0
        self.out_q: Any = ctx.Queue()
        self.cmd_qs: list[Any] = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=worker_main, args=(i, init, self.cmd_qs[i], self.out_q),
                                  name=f"inventory-bench-worker-{i}", daemon=True)
                      for i in range(n)]
        for p in self.procs:
            p.start()
        ready: set[int] = set()
        deadline = time.monotonic() + start_timeout_s
        while len(ready) < n:
            kind, wid, payload = self._get(deadline)
            if kind == "error":
                raise RuntimeError(f"bench worker {wid} failed to start:\n{payload}")
            if kind == "ready":
                ready.add(wid)

    def _get(self, deadline: float) -> tuple[str, int, Any]:
        while True:
            try:
                msg: tuple[str, int, Any] = self.out_q.get(timeout=0.25)
                return msg
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"bench worker(s) died: {dead}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError("bench workers did not answer in time") from None

    def run(self, plan: Plan, on_progress: Callable[[str], None] | None = None) -> PhaseStats:
        """Run one phase on every worker and merge what they measured."""
        for wid in range(self.n):
            self.cmd_qs[wid].put(replace(plan, rate=plan.rate / self.n,
                                         users=_share(plan.users, wid, self.n)))
        total_s = plan.warmup_s + plan.duration_s
        deadline = time.monotonic() + total_s + plan.drain_s + 60
        merged, done = PhaseStats(), 0
        counts: dict[int, tuple[int, int, int, int]] = {}
        t0 = last_t = time.monotonic()
        last_calls = last_errors = 0
        while done < self.n:
            kind, wid, payload = self._get(deadline)
            if kind == "error":
                raise RuntimeError(f"bench worker {wid} failed in {plan.label}:\n{payload}")
            if kind == "result":
                merged.merge(PhaseStats.from_dict(payload))
                done += 1
            elif kind == "progress":
                counts[wid] = payload
            now = time.monotonic()
            if now - last_t >= 1.0 and counts:
                calls, errors, shed, inflight = (sum(c[i] for c in counts.values()) for i in range(4))
                dt = now - last_t
                line = (f"{plan.label:<34} {now - t0:5.1f}/{total_s:.0f}s  "
                        f"{(calls - last_calls) / dt:8.0f} calls/s  "
                        f"{(errors - last_errors) / dt:6.0f} err/s  shed {shed:<6} inflight {inflight:<5}")
                last_t, last_calls, last_errors = now, calls, errors
                if on_progress is not None:
                    on_progress(line)
                elif self.progress:
                    self._print(line)
        if self.progress and on_progress is None:
            self._print("", end=True)
        return merged

    def _print(self, line: str, end: bool = False) -> None:
        """Overwrite one line on a terminal; elsewhere (logs) a line every 5 s."""
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line.ljust(118)[:118] + ("\n" if end else ""))
        elif line and time.monotonic() - self._last_log >= 5.0:
            self._last_log = time.monotonic()
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        for q in self.cmd_qs:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self.procs:
            p.join(timeout=15)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
