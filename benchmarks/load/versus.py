"""Ours against the Postgres-only peer (and the echo anchor): every figure of every round, its
median over the rounds, and the ratio ours / peer of the medians (issue 11).

A figure is "higher"-is-better (throughput), "lower"-is-better (latency, CPU per operation) or
neither (counts). Latency at 70 % is each system at 70 % of its own maximum. CPU per operation
is measured at the saturated step: "server" sums the processes of the system (ours: service,
Redis, Postgres; the peer: peer, Postgres), "own" is the service's process alone; the latency
proxy is reported apart, as it stands for the network.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.load.scenarios import SCENARIOS

SERVER_PROCESSES = {"ours": ("service", "redis", "postgres", "standby"),
                    "peer": ("peer", "postgres", "standby")}
OWN_PROCESS = {"ours": "service", "peer": "peer"}
FLASH = ("flash-sale", "flash-hot")

# issue 11's targets for ours / peer, by profile ("network": any store latency)
TARGETS: dict[str, dict[tuple[str, str], float]] = {
    "localhost": {("reserve", "Reserve max OK/s"): 1.2, ("cart", "sessions/s"): 1.0,
                  ("availability", "GetAvailability max OK/s"): 1.5,
                  ("flash-sale", "Reserve attempts/s"): 1.5,
                  ("flash-hot", "Reserve attempts/s"): 1.5},
    "network": {("flash-hot", "Reserve attempts/s"): 3.0, ("reserve", "Reserve max OK/s"): 2.0},
}


def _cpu(step: dict[str, Any], system: str) -> tuple[float | None, float | None]:
    cpu = step.get("cpu_ms_per_op") or {}
    if not cpu:
        return None, None
    return (sum(cpu.get(k, 0.0) for k in SERVER_PROCESSES.get(system, ())),
            cpu.get(OWN_PROCESS.get(system, ""), None))


def figures(name: str, s: dict[str, Any], system: str) -> list[tuple[str, str, float | None]]:
    """(metric, better, value) of one system's summary of one scenario in one round."""
    sat = s["steps"][0]
    out: list[tuple[str, str, float | None]] = []
    if name in FLASH:
        r = sat["rpcs"].get("Reserve", {})
        # attempts decided (a unit sold, or sold out); refused ones ("retry") are not counted
        out += [("Reserve attempts/s", "higher", r.get("answered_per_s")),
                ("units sold", "", r.get("ok")),
                ("Reserve p50 ms", "lower", r.get("p50_ms")),
                ("Reserve p99 ms", "lower", r.get("p99_ms"))]
        unit = "attempt"
    else:
        rpcs = [x for x in SCENARIOS[name].rpcs if x in s["max_rpc_ok_per_s"]]
        if name == "cart":
            # a session with a refused call ends or fails there: not a session served
            refused = sum(r["refused_per_s"] for r in sat["rpcs"].values())
            out.append(("sessions/s", "higher", max(0.0, s["max_ops_per_s"] - refused)))
        out += [(f"{rpc} max OK/s", "higher", s["max_rpc_ok_per_s"][rpc]) for rpc in rpcs]
        at70 = s.get("at_70pct")
        for rpc in rpcs:
            r70 = (at70 or {}).get("rpcs", {}).get(rpc)
            if r70:
                out += [(f"{rpc} p50 ms at 70 %", "lower", r70["p50_ms"]),
                        (f"{rpc} p99 ms at 70 %", "lower", r70["p99_ms"])]
        if rpcs and rpcs[0] in sat["rpcs"]:
            out.append((f"{rpcs[0]} p99 ms at max", "lower", sat["rpcs"][rpcs[0]]["p99_ms"]))
        unit = "session" if name == "cart" else "call"
    server, own = _cpu(sat, system)
    out += [(f"server CPU ms per {unit}", "lower", server),
            (f"service process CPU ms per {unit}", "lower", own)]
    return out


def _median(values: list[float | None]) -> float | None:
    xs = [float(x) for x in values if x is not None]
    return statistics.median(xs) if xs else None


def compare(result: dict[str, Any], per_round: list[dict[str, Any]],
            systems: list[str]) -> dict[str, Any]:
    """The rows of the comparison: per scenario and figure, each system's value in every round,
    the medians, ours / peer and each / echo (throughput only), and issue 11's target if any."""
    echo_a = result["anchors"].get("echo")
    echo = echo_a["max_rpc_per_s"].get("Echo") if echo_a else None
    profile = result["meta"].get("profile", "localhost")
    targets = TARGETS["localhost" if profile == "localhost" else "network"]
    rows: list[dict[str, Any]] = []
    proxy: list[dict[str, Any]] = []
    scenarios = [n for n in result["meta"]["config"]["scenarios"]
                 if any(n in rd.get("ours", {}) for rd in per_round)]
    for name in scenarios:
        by_metric: dict[str, dict[str, Any]] = {}
        for system in systems:
            for rd in per_round:
                s = rd.get(system, {}).get(name)
                if s is None:
                    continue
                for metric, better, value in figures(name, s, system):
                    row = by_metric.setdefault(metric, {"scenario": name, "metric": metric,
                                                        "better": better, "rounds": {}})
                    row["rounds"].setdefault(system, []).append(value)
                px = s["steps"][0].get("proxy")
                if px:
                    proxy.append({"scenario": name, "system": system, "round": rd["round"],
                                  "cpu_pct": px["cpu_pct"], "cpu_ms_per_op": px["cpu_ms_per_op"],
                                  "late_p50_us": {k: v.get("late_p50_us")
                                                  for k, v in px["routes"].items()},
                                  "late_p99_us": {k: v.get("late_p99_us")
                                                  for k, v in px["routes"].items()},
                                  "chunks_per_op": {k: v.get("chunks_per_op")
                                                    for k, v in px["routes"].items()}})
        for metric, row in by_metric.items():
            for system in systems:
                row[system] = _median(row["rounds"].get(system, []))
            ours, peer = row.get("ours"), row.get("peer")
            row["ratio"] = ours / peer if ours is not None and peer else None
            if row["better"] == "higher" and echo:
                for system in systems:
                    v = row.get(system)
                    row[f"{system}_to_echo"] = v / echo if v is not None else None
            need = targets.get((name, metric))
            if need is not None and row["ratio"] is not None:
                row["target"] = need
                row["pass"] = row["ratio"] >= need
            rows.append(row)
    return {"profile": profile, "rounds": len(per_round), "systems": systems, "echo_per_s": echo,
            "rows": rows, "proxy": proxy}
