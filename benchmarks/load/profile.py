"""Where the service's time goes: py-spy samples of the service process during a saturated phase,
summarised by function (self and inclusive) and by layer (gRPC, protobuf, asyncpg, redis, ...)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# (layer, pattern on the frame's file) — first match wins, so the order matters.
LAYERS: tuple[tuple[str, str], ...] = (
    ("grpc", r"grpc/"),
    ("protobuf", r"google/protobuf|_pb2"),
    ("asyncpg", r"asyncpg/"),
    ("redis client", r"redis/"),
    ("service: transport", r"inventory_svc/transport/"),
    ("service: app", r"inventory_svc/app/"),
    ("service: storage", r"inventory_svc/storage/"),
    ("service: domain", r"inventory_svc/domain/"),
    ("routing solver", r"(^|/)routing/"),
    ("numba/numpy", r"numba/|numpy/"),
    ("asyncio/uvloop", r"asyncio/|uvloop"),
    ("logging", r"logging/"),
)
_OWN = re.compile(r"inventory_svc/|(^|/)routing/")  # inclusive time only for our own code
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(:\d+)?\)$")


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def start(pid: int, out: Path, duration_s: float, rate: int = 100) -> subprocess.Popen[bytes] | None:
    """Sample pid for duration_s into out (py-spy raw/collapsed format); None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))),
         "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _split(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    return (m["func"], m["file"]) if m else (frame, "")


def _layer(file: str) -> str:
    for name, pattern in LAYERS:
        if re.search(pattern, file):
            return name
    return "other python"


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self time by function and by layer, inclusive time of the service's own functions, as %
    of the samples (py-spy counts only samples where a thread runs Python, not idle waits)."""
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    layer: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        n = int(count_s)
        total += n
        frames = [_split(f) for f in stack.split(";")]
        func, file = frames[-1]
        self_fn[f"{func} ({file})"] += n
        layer[_layer(file)] += n
        for f in {f"{fn} ({fl})" for fn, fl in frames if _OWN.search(fl)}:
            incl_fn[f] += n

    def pct(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, 100.0 * v / total) for name, v in c.most_common(k)] if total else []

    return {"samples": total, "by_layer_self_pct": pct(layer, len(layer)),
            "top_self_pct": pct(self_fn, top), "top_inclusive_pct": pct(incl_fn, top)}
