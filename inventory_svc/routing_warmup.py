"""The routing solver's kernels, brought in while the service already serves inventory calls.

The kernels are numba code: loaded from numba's on-disk cache they are ready in about a second,
but compiled (the first start on a machine, a new version, another CPU model) they take
routing.warm.EXPECTED_COMPILE. So:

1. load them from the cache in a thread; if one is missing, that stops before compiling anything;
2. otherwise compile them in a child process (`python -m routing.warm`), which saves them in the
   cache and cannot stall this process's event loop or hold its GIL; its progress is logged;
3. then load them (from the cache, now) in a thread; if the cache cannot be used (no writable
   directory) they are compiled in that thread instead.

The child is this process's: it is stopped when the warm-up is cancelled (the service stops) and
dies with us (PR_SET_PDEATHSIG). Threads are daemons: a stop never waits for a compile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from inventory_svc.embedded.process import pdeathsig_preexec
from routing import warm

log = logging.getLogger(__name__)
T = TypeVar("T")
STOP_WAIT_S = 5.0  # for the child to exit after SIGTERM, before SIGKILL


class WarmUpFailed(RuntimeError):
    """The child process could not compile the kernels into the cache."""


def loaded() -> bool:
    """Are the kernels in this process already (an earlier service in it, tests)?"""
    return "routing.kernels" in sys.modules


async def bring_in(on_compile: Callable[[], None]) -> str:
    """Load (or compile, then load) the kernels; `on_compile` is called when a compile is
    needed. Returns what happened, for the log."""
    start = time.monotonic()
    if loaded():
        return "already loaded in this process"
    try:
        report = await _in_thread(_load_cached)
        return f"loaded {report.loaded} kernels from numba's cache in {_since(start)}"
    except warm.CompileNeeded as exc:
        first = str(exc)
    on_compile()
    log.info("routing: %s is not in numba's cache (a first start on this machine, a new version "
             "or another CPU model): compiling the solver's kernels in a background process, %s; "
             "inventory calls are served meanwhile, routing calls answer UNAVAILABLE until then",
             first, warm.EXPECTED_COMPILE)
    try:
        done = await compile_in_child()
        compiled = f"compiled {done['compiled']} kernels in {done['seconds']:.0f} s"
    except (OSError, WarmUpFailed) as exc:
        log.warning("routing: compiling in a background process failed (%s); compiling in this "
                    "process instead", exc)
        compiled = "compiled them in this process"
    report = await _in_thread(_load)
    if report.compiled:
        log.warning("routing: the kernels could not be loaded from numba's cache (%s) and were "
                    "compiled in this process; every start will do that again: set "
                    "NUMBA_CACHE_DIR to a writable directory", report.cache_dir)
    return f"{compiled}; ready after {_since(start)} (cache {report.cache_dir})"


def _load_cached() -> warm.Report:
    report = warm.load_cached()
    _smoke()
    return report


def _load() -> warm.Report:
    report = warm.import_kernels()
    _smoke()
    return report


def _smoke() -> None:
    from routing.solver import warm_up

    warm_up()  # every policy and method once (nothing compiles: the signatures are fixed)


def _since(start: float) -> str:
    return f"{time.monotonic() - start:.1f} s"


async def _in_thread(fn: Callable[[], T]) -> T:
    """`fn()` in a daemon thread (asyncio.to_thread's threads are waited for at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def run() -> None:
        try:
            result: tuple[bool, Any] = (True, fn())
        except BaseException as exc:  # handed to the awaiting task
            result = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=run, name="routing-warm-up", daemon=True).start()
    return await future


async def compile_in_child() -> dict[str, Any]:
    """Run `python -m routing.warm` for the very `routing` this process imports; log its
    progress; return its summary. Cancelling stops the child."""
    env = dict(os.environ)
    # the child must compile this process's `routing` (numba's cache is keyed by its
    # directory), whatever the working directory (-P: not put on sys.path) holds
    here = str(warm.ROUTING_DIR.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "routing.warm", "--json", env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # its own session (so its own process group): Ctrl-C reaches the service, which stops
        # it in order (not process_group=0: uvloop, the service's loop, does not take it)
        preexec_fn=pdeathsig_preexec(), start_new_session=True)
    errors: collections.deque[str] = collections.deque(maxlen=20)
    drain = asyncio.create_task(_collect(proc.stderr, errors))
    try:
        done = await _follow(proc)
        code = await proc.wait()
    except BaseException:
        await _stop(proc)
        raise
    finally:
        await asyncio.gather(drain, return_exceptions=True)
    if code != 0 or done is None:
        raise WarmUpFailed(f"exit status {code}: {' | '.join(errors) or 'no output'}")
    if done.get("routing_dir") != str(warm.ROUTING_DIR):
        raise WarmUpFailed(f"the child compiled {done.get('routing_dir')}, not {warm.ROUTING_DIR}")
    return done


async def _follow(proc: asyncio.subprocess.Process) -> dict[str, Any] | None:
    """Log the child's progress (every quarter of the kernels); its summary."""
    assert proc.stdout is not None
    start = time.monotonic()
    quarter = 0
    done: dict[str, Any] | None = None
    async for raw in proc.stdout:
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if entry.get("event") == "waiting":
            log.info("routing: another process (pid %s) is compiling the kernels; waiting for "
                     "it, then loading them", entry.get("holder") or "?")
        elif entry.get("event") == "compiling":
            n, total = int(entry["done"]), max(1, int(entry["total"]))
            if n * 4 // total > quarter:
                quarter = n * 4 // total
                log.info("routing: compiled %d of %d kernels (%.0f s)", n, total,
                         time.monotonic() - start)
        elif entry.get("event") == "done":
            done = entry
    return done


async def _collect(stream: asyncio.StreamReader | None, into: collections.deque[str]) -> None:
    if stream is not None:
        async for raw in stream:
            if line := raw.decode(errors="replace").strip():
                into.append(line)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL when it does not exit within STOP_WAIT_S."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), STOP_WAIT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
