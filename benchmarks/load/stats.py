"""Latency histograms and per-RPC counters, mergeable across worker processes.

Buckets are logarithmic (each 1 % wider than the last, HDR-style), so a histogram is a small sparse
dict whatever the number of samples, two histograms merge by adding counts, and every quantile is
exact to within 1 %.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

GROWTH = 1.01
_LOG_GROWTH = math.log(GROWTH)
SLOW_S = 0.020  # the p99 target: calls slower than this are counted per second
REFUSALS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")  # answers that decided nothing: retry later
QUANTILES = (("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99), ("p999_ms", 0.999))


def _bucket(seconds: float) -> int:
    return int(math.log(max(seconds * 1e6, 1.0)) / _LOG_GROWTH)


def _bucket_mid_s(index: int) -> float:
    return float(GROWTH ** (index + 0.5)) / 1e6


class Histogram:
    """Latencies in seconds, in log buckets of 1 % relative width (1 µs .. hours)."""

    __slots__ = ("counts", "max", "min", "n", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def record(self, seconds: float) -> None:
        b = _bucket(seconds)
        self.counts[b] = self.counts.get(b, 0) + 1
        self.n += 1
        self.total += seconds
        self.min = min(self.min, seconds)
        self.max = max(self.max, seconds)

    def merge(self, other: Histogram) -> None:
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        self.n += other.n
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """The q-quantile in seconds (0 for an empty histogram)."""
        if self.n == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(max(_bucket_mid_s(b), self.min), self.max)
        return self.max

    def buckets_ms(self) -> list[tuple[float, float, int]]:
        """(low ms, high ms, count) of every non-empty bucket, ascending."""
        return [(GROWTH**b / 1e3, GROWTH ** (b + 1) / 1e3, self.counts[b]) for b in sorted(self.counts)]

    def to_dict(self) -> dict[str, Any]:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "n": self.n,
                "total": self.total, "min": self.min if self.n else 0.0, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        h = cls()
        h.counts = {int(k): int(v) for k, v in d["counts"].items()}
        h.n, h.total, h.max = int(d["n"]), float(d["total"]), float(d["max"])
        h.min = float(d["min"]) if h.n else math.inf
        return h


@dataclass
class RpcStats:
    """One RPC (or anchor operation) in one phase: latencies of every answered call, outcomes."""

    hist: Histogram = field(default_factory=Histogram)
    ok_hist: Histogram = field(default_factory=Histogram)  # the calls answered OK only
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    items: int = 0  # logical operations (a pipeline of 100 EVALSHA is 100 items)
    in_window: int = 0  # items completed before the measuring window closed
    examples: dict[str, str] = field(default_factory=dict)  # code -> first error message seen

    def record(self, seconds: float, code: str | None, items: int, in_window: bool,
               detail: str = "") -> None:
        self.hist.record(seconds)
        if code is None:
            self.ok_hist.record(seconds)
            self.ok += 1
        else:
            self.errors[code] += 1
            if code not in self.examples:
                self.examples[code] = detail[:200]
        self.items += items
        if in_window:
            self.in_window += items

    def merge(self, other: RpcStats) -> None:
        self.hist.merge(other.hist)
        self.ok_hist.merge(other.ok_hist)
        self.ok += other.ok
        self.errors.update(other.errors)
        self.items += other.items
        self.in_window += other.in_window
        for code, text in other.examples.items():
            self.examples.setdefault(code, text)

    def to_dict(self) -> dict[str, Any]:
        return {"hist": self.hist.to_dict(), "ok_hist": self.ok_hist.to_dict(), "ok": self.ok,
                "errors": dict(self.errors),
                "items": self.items, "in_window": self.in_window, "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RpcStats:
        return cls(Histogram.from_dict(d["hist"]), Histogram.from_dict(d["ok_hist"]), int(d["ok"]),
                   Counter(d["errors"]), int(d["items"]), int(d["in_window"]),
                   dict(d.get("examples", {})))


@dataclass
class PhaseStats:
    """Everything one worker (or, merged, all workers) measured in one phase."""

    rpcs: dict[str, RpcStats] = field(default_factory=dict)
    ops: int = 0  # scenario operations (e.g. whole cart sessions) completed inside the window
    all_ops: int = 0  # every operation completed in the phase, warm-up and drain included
    shed: int = 0  # open loop: arrivals dropped because the outstanding cap was reached
    unfinished: int = 0  # calls still running at the end of the drain, cancelled
    cpu_s: float = 0.0  # client CPU (user + system) over the phase
    wall_s: float = 0.0  # phase length including warm-up and drain
    window_s: float = 0.0  # the measuring window
    client_errors: Counter[str] = field(default_factory=Counter)  # exceptions in our own code
    # per second of the window, by intended start: [calls, max latency s, calls over SLOW_S]
    timeline: dict[int, list[float]] = field(default_factory=dict)
    t0_wall: float = 0.0  # wall-clock time (epoch s) the window opened, to line up with logs

    def tick(self, second: int, seconds: float) -> None:
        row = self.timeline.get(second)
        if row is None:
            row = self.timeline[second] = [0, 0.0, 0]
        row[0] += 1
        row[1] = max(row[1], seconds)
        row[2] += seconds > SLOW_S

    def rpc(self, name: str) -> RpcStats:
        s = self.rpcs.get(name)
        if s is None:
            s = self.rpcs[name] = RpcStats()
        return s

    def merge(self, other: PhaseStats) -> None:
        for name, s in other.rpcs.items():
            self.rpc(name).merge(s)
        self.ops += other.ops
        self.all_ops += other.all_ops
        self.shed += other.shed
        self.unfinished += other.unfinished
        self.cpu_s += other.cpu_s
        self.wall_s = max(self.wall_s, other.wall_s)
        self.window_s = max(self.window_s, other.window_s)
        self.client_errors.update(other.client_errors)
        for sec, (n, mx, slow) in other.timeline.items():
            row = self.timeline.setdefault(sec, [0, 0.0, 0])
            row[0] += n
            row[1] = max(row[1], mx)
            row[2] += slow
        if other.t0_wall and (not self.t0_wall or other.t0_wall < self.t0_wall):
            self.t0_wall = other.t0_wall

    def to_dict(self) -> dict[str, Any]:
        return {"rpcs": {k: v.to_dict() for k, v in self.rpcs.items()}, "ops": self.ops,
                "all_ops": self.all_ops,
                "shed": self.shed, "unfinished": self.unfinished, "cpu_s": self.cpu_s,
                "wall_s": self.wall_s, "window_s": self.window_s,
                "client_errors": dict(self.client_errors),
                "timeline": {str(k): v for k, v in self.timeline.items()}, "t0_wall": self.t0_wall}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseStats:
        return cls({k: RpcStats.from_dict(v) for k, v in d["rpcs"].items()}, int(d["ops"]),
                   int(d.get("all_ops", 0)), int(d["shed"]), int(d["unfinished"]),
                   float(d["cpu_s"]), float(d["wall_s"]),
                   float(d["window_s"]), Counter(d["client_errors"]),
                   {int(k): list(v) for k, v in d.get("timeline", {}).items()},
                   float(d.get("t0_wall", 0.0)))


def summarize_rpc(s: RpcStats, window_s: float) -> dict[str, Any]:
    """Throughput and percentiles of one RPC in one phase, for the report and the JSON."""
    out: dict[str, Any] = {
        "calls": s.hist.n,
        "ok": s.ok,
        "items": s.items,
        "throughput_per_s": s.in_window / window_s if window_s > 0 else 0.0,
        "ok_ratio": s.ok / s.hist.n if s.hist.n else 0.0,
        "mean_ms": s.hist.total / s.hist.n * 1e3 if s.hist.n else 0.0,
        "max_ms": s.hist.max * 1e3,
        "errors": dict(sorted(s.errors.items())),
        "error_examples": dict(sorted(s.examples.items())),
    }
    for key, q in QUANTILES:
        out[key] = s.hist.quantile(q) * 1e3
    # calls a second that were refused ("try later": shed, or the service unavailable), and
    # those answered otherwise: a refusal is fast, and counting it as an attempt would reward it
    refused = sum(s.errors.get(code, 0) for code in REFUSALS)
    out["refused_per_s"] = out["throughput_per_s"] * refused / s.hist.n if s.hist.n else 0.0
    out["answered_per_s"] = out["throughput_per_s"] - out["refused_per_s"]
    # every call above; the ones answered OK alone, which is what shedding protects
    out["ok_p50_ms"] = s.ok_hist.quantile(0.50) * 1e3
    out["ok_p99_ms"] = s.ok_hist.quantile(0.99) * 1e3
    return out
