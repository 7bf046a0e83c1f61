"""How many CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota.

`os.cpu_count()` answers for the machine. In a container limited to 2 CPUs on a 64-core node a
worker per reported core would mean 64 processes time-sliced onto 2 CPUs' worth of quota: the
kernel throttles them all, and every call's latency grows with the throttling periods. So the
default worker count is min(affinity, ceil(quota / period)) over the cgroup hierarchy (v2
`cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), at least 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

PROC_SELF = Path("/proc/self")


def usable_cpus(proc_self: Path = PROC_SELF, affinity: int | None = None) -> int:
    """CPUs this process may use: the affinity mask's size, capped by the cgroup quota, >= 1."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_self)
    if quota is not None:
        affinity = min(affinity, math.ceil(quota))
    return max(1, affinity)


def cgroup_cpu_quota(proc_self: Path = PROC_SELF) -> float | None:
    """The tightest CPU quota (in CPUs) on the process's cgroup and its ancestors, v2 or v1;
    None when there is none (or no cgroup filesystem to read)."""
    try:
        memberships = (proc_self / "cgroup").read_text().splitlines()
        mounts = (proc_self / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in memberships:
        hid, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hid == "0" and controllers == "":  # cgroup v2 (unified)
            found += _limits(_mounted(mounts, path, None), _v2_limit)
        elif "cpu" in controllers.split(","):  # cgroup v1 cpu controller
            found += _limits(_mounted(mounts, path, "cpu"), _v1_limit)
    return min(found, default=None)


def _mounted(mounts: list[str], path: str, v1_controller: str | None) -> list[Path]:
    """The directories of cgroup `path` and of its ancestors up to the mount's root, innermost
    first, under the mount of its hierarchy (none when it is not mounted here)."""
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        fstype, options = rest[0], rest[2].split(",")
        if v1_controller is None and fstype != "cgroup2":
            continue
        if v1_controller is not None and (fstype != "cgroup" or v1_controller not in options):
            continue
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        # In a cgroup namespace the process's path is relative to the namespace root, which is
        # the mount's root; without one a container sees the host path, of which the mount
        # shows only the part below its root.
        rel = path
        if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
            rel = path[len(root.rstrip("/")):]
        parts = [p for p in rel.split("/") if p]
        if ".." in parts:  # a cgroup outside our namespace's view: nothing to read
            return []
        return [point.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return []


def _limits(dirs: list[Path], read: Callable[[Path], float | None]) -> list[float]:
    return [x for x in map(read, dirs) if x is not None]


def _v2_limit(d: Path) -> float | None:
    """`cpu.max`: "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit."""
    try:
        quota, _, period = (d / "cpu.max").read_text().strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_limit(d: Path) -> float | None:
    """`cpu.cfs_quota_us` (-1: no limit) over `cpu.cfs_period_us`."""
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
