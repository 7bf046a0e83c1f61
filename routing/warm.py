"""Bring the routing kernels in: load them from numba's on-disk cache, or compile them into it.

`python -m routing.warm` compiles every kernel that is not in the cache yet (a first start on a
machine, a new version, another CPU model) and saves it there, so that the next process loads it
in about a second. The service runs it as a child process (inventory_svc/routing_warmup.py), so
the compile (~30-90 s of one CPU core) neither blocks its event loop nor holds its GIL, and the
image build runs it once (Dockerfile) for the installed package. One compile at a time per user
(a file lock): the workers of `serve --workers N` on a cold machine compile once, not N times.

numba keys its cache by the directory of the source files: a cache built for one copy of
`routing` (a source tree) is never used by another (the installed package). `--require-installed`
fails unless this `routing` is the installed one.

Output: progress lines as it compiles, and a summary; with `--json` one JSON object a line (what
the service reads): {"event": "waiting"|"compiling"|"done", ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

ROUTING_DIR = Path(__file__).resolve().parent
KERNEL_MODULES = ("routing.evaluate", "routing.pool", "routing.bnb", "routing.kernels")
# One CPU core of a 2020s laptop or server; a busy or slow machine takes longer.
EXPECTED_COMPILE = "usually 30-90 s of one CPU core"


@dataclass(frozen=True, slots=True)
class Report:
    """What importing the kernels did: how many were compiled and how many loaded from the
    cache, and where that cache is (None: numba found no usable cache directory)."""

    compiled: int
    loaded: int
    seconds: float
    cache_dir: str | None
    routing_dir: str

    @property
    def saved(self) -> bool:
        return self.cache_dir is not None and Path(self.cache_dir).is_dir()


class CompileNeeded(RuntimeError):
    """Raised by `load_cached` when a kernel is not in the cache."""


def kernel_count(modules: tuple[str, ...] = KERNEL_MODULES) -> int:
    """How many kernels these modules define (their `@kernel(` decorators)."""
    total = 0
    for name in modules:
        total += (ROUTING_DIR / f"{name.rsplit('.', 1)[1]}.py").read_text().count("\n@kernel(")
    return total


def _listener(on_compile: Callable[[str], None]) -> Any:
    from numba.core import event

    class Compiles(event.Listener):
        """Sees numba compile a routing kernel: the "numba:compile" event is broadcast only when
        the dispatcher did not find the signature in its cache (numba.core.event)."""

        def on_start(self, ev: Any) -> None:
            fn = ev.data["dispatcher"].py_func
            if fn.__module__.startswith("routing."):
                on_compile(f"{fn.__module__}.{fn.__qualname__}")

        def on_end(self, ev: Any) -> None:
            pass

    return Compiles()


def import_kernels(modules: tuple[str, ...] = KERNEL_MODULES,
                   on_compile: Callable[[str], None] | None = None) -> Report:
    """Import the kernel modules (which loads or compiles each kernel: routing/_types.py) and
    report. `on_compile` is called before each compile; an exception from it stops the import."""
    from numba.core import event

    from routing import _types

    start = time.perf_counter()
    with event.install_listener("numba:compile", _listener(on_compile or (lambda _: None))):
        for name in modules:
            importlib.import_module(name)
    # the latest dispatcher of each kernel (an import stopped by `on_compile` leaves some behind)
    mine = list({(k.py_func.__module__, k.py_func.__qualname__): k for k in _types.KERNELS
                 if k.py_func.__module__ in modules}.values())
    compiled = sum(sum(k.stats.cache_misses.values()) for k in mine)
    loaded = sum(sum(k.stats.cache_hits.values()) for k in mine)
    paths = {k.stats.cache_path for k in mine}
    cache_dir = paths.pop() if len(paths) == 1 else None
    return Report(compiled, loaded, time.perf_counter() - start, cache_dir, str(ROUTING_DIR))


def load_cached() -> Report:
    """Import every kernel if all of them are in the cache; raise CompileNeeded (having compiled
    nothing) at the first that is not. Run it again after `python -m routing.warm`."""
    def refuse(name: str) -> None:
        raise CompileNeeded(name)

    return import_kernels(on_compile=refuse)


def installed() -> bool:
    """Is this `routing` the installed package (site-packages), not a source tree?"""
    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    return ROUTING_DIR.parent in roots


@contextlib.contextmanager
def _one_at_a_time(out: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Hold the per-user warm-up lock (waiting for another compile to finish first). Without a
    writable temporary directory, go on without it."""
    path = Path(tempfile.gettempdir()) / f"inventory-routing-warm-{os.getuid()}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            out({"event": "waiting", "holder": holder})
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def main(argv: list[str] | None = None, stdout: TextIO = sys.stdout) -> int:
    p = argparse.ArgumentParser(prog="python -m routing.warm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.add_argument("--require-installed", action="store_true",
                   help="fail unless `routing` is the installed package (image builds)")
    p.add_argument("--modules", nargs="+", choices=KERNEL_MODULES, default=list(KERNEL_MODULES),
                   help="only these kernel modules (and what they import); default: all")
    args = p.parse_args(argv)
    modules = tuple(args.modules)

    def out(entry: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(entry), file=stdout, flush=True)
        elif entry["event"] == "waiting":
            print(f"routing.warm: waiting for pid {entry['holder']}, which is compiling the "
                  "kernels", file=stdout, flush=True)
        elif entry["event"] == "compiling":
            print(f"routing.warm: compiling {entry['kernel']} ({entry['done'] + 1}/"
                  f"{entry['total']})", file=stdout, flush=True)

    if args.require_installed and not installed():
        print(f"routing.warm: {ROUTING_DIR} is not the installed package; numba's cache is "
              "keyed by the source directory, so a cache built here would not be used by the "
              "installed service. Run from a directory without a `routing` package.",
              file=sys.stderr)
        return 2
    total = kernel_count(modules)
    done = 0

    def compiling(name: str) -> None:
        nonlocal done
        out({"event": "compiling", "kernel": name, "done": done, "total": total})
        done += 1

    with _one_at_a_time(out):
        report = import_kernels(modules, compiling)
        if modules == KERNEL_MODULES:
            from routing.solver import warm_up

            warm_up()  # every policy and method once: nothing is left to compile at a call
    out({"event": "done", **asdict(report), "saved": report.saved, "kernels": total})
    if not args.json:
        what = (f"compiled {report.compiled} kernels in {report.seconds:.1f} s"
                if report.compiled else f"loaded {report.loaded} kernels from the cache")
        print(f"routing.warm: {what}; cache {report.cache_dir}; routing at {report.routing_dir}",
              file=stdout, flush=True)
    if not report.saved:
        print("routing.warm: numba found no writable cache directory, so nothing was saved: "
              "set NUMBA_CACHE_DIR to one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
