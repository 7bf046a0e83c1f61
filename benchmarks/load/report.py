"""The verdict (ratios against the anchors and the issue's targets) and the Markdown report."""

from __future__ import annotations

from typing import Any

# (RPC, the scenario that measures its maximum alone, required share of the echo's maximum)
THROUGHPUT_TARGETS = (("Reserve", "reserve", 0.50), ("GetAvailability", "availability", 0.80),
                      ("RouteAndReserve", "route", 0.35))
P99_TARGET_MS = 20.0


SINGLE_THREADED = ("service", "echo", "redis")  # a Python event loop, Redis: one core at most


def cpu_capacity(cpu: dict[str, float] | None, cores: int) -> float | None:
    """Operations/s this box could do if CPU were the only limit and nothing else ran:
    min(all cores / CPU ms of every process per op, one core / the busiest single-threaded one)."""
    if not cpu:
        return None
    total = sum(cpu.values())
    limits = [cores * 1000 / total] if total > 0 else []
    limits += [1000 / cpu[k] for k in SINGLE_THREADED if cpu.get(k, 0) > 0.05]
    return min(limits) if limits else None


def _anchor_max(result: dict[str, Any], name: str, rpc: str) -> float | None:
    a = result["anchors"].get(name)
    return a["max_rpc_per_s"].get(rpc) if a else None


def evaluate(result: dict[str, Any]) -> dict[str, Any]:
    """Throughput ratios to the echo (and to the Redis and Postgres anchors), p99 at 70 % of each
    scenario's maximum, the flash sale and the invariant check, each with pass/fail."""
    scen = result["scenarios"]
    echo = _anchor_max(result, "echo", "Echo")
    redis = _anchor_max(result, "redis-evalsha", "EVALSHA hold.lua")
    pg = _anchor_max(result, "pg-reserve-tx", "PG reserve tx")
    cores = int(result["meta"]["machine"].get("cores") or 2)
    echo_anchor = result["anchors"].get("echo")
    echo_est = cpu_capacity(echo_anchor["steps"][0].get("cpu_ms_per_op"), cores) \
        if echo_anchor else None
    throughput = []
    for rpc, name, need in THROUGHPUT_TARGETS:
        if name not in scen:
            continue
        thr = scen[name]["max_rpc_ok_per_s"].get(rpc, 0.0)
        cpu = scen[name]["steps"][0].get("cpu_ms_per_op")
        est = cpu_capacity(cpu, cores)
        row: dict[str, Any] = {"rpc": rpc, "scenario": name, "max_ok_per_s": thr,
                               "echo_per_s": echo, "target_ratio": need, "cpu_ms_per_op": cpu,
                               "cpu_bound_est_per_s": est, "echo_cpu_bound_est_per_s": echo_est}
        if est and echo_est:
            row["est_ratio_to_echo"] = est / echo_est
        if echo:
            row["ratio_to_echo"] = thr / echo
            row["pass"] = thr / echo >= need
            row["short_by_pct"] = max(0.0, 100 * (1 - thr / (need * echo)))
        if redis:
            row["ratio_to_redis_evalsha"] = thr / redis
        if pg:
            row["ratio_to_pg_tx"] = thr / pg
        throughput.append(row)
    latency = []
    for name, s in scen.items():
        step = s["steps"][0] if name == "flash-sale" else s.get("at_70pct")
        if not step:
            continue
        for rpc, r in step["rpcs"].items():
            latency.append({"scenario": name, "rpc": rpc, "load": step["label"],
                            "p99_ms": r["p99_ms"], "pass": r["p99_ms"] <= P99_TARGET_MS,
                            "over_by_ms": max(0.0, r["p99_ms"] - P99_TARGET_MS)})
    inv = result.get("invariants") or {}
    out: dict[str, Any] = {"throughput": throughput, "p99_at_70pct": latency,
                           "invariants_ok": inv.get("ok")}
    for name in ("flash-sale", "flash-hot"):
        if name not in scen:
            continue
        fs = inv.get("flash_sale") or {} if name == "flash-sale" else {}
        if runs := [f for f in inv.get("flash_sales", []) if f["label"].startswith(name + " ")]:
            fs = {"ok": all(f["ok"] for f in runs), "exact": all(f["exact"] for f in runs)}
        p99 = scen[name]["steps"][0]["rpcs"].get("Reserve", {}).get("p99_ms")
        out[name.replace("-", "_")] = {
            "oversold": 0 if fs.get("ok") else None, "exact": fs.get("exact"), "p99_ms": p99,
            "pass": bool(fs.get("ok")) and p99 is not None and p99 <= P99_TARGET_MS}
    return out


def _errors(e: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in e.items()) or "—"


def _f(x: float | None, nd: int = 1) -> str:
    return "—" if x is None else f"{x:,.{nd}f}"


def _cpu(step: dict[str, Any]) -> str:
    srv = step.get("server_cpu_pct", {})
    parts = [f"client {step['client_cpu_pct']:.0f}"] + [f"{k} {v:.0f}" for k, v in srv.items() if v >= 0.5]
    if "other_cpu_pct" in step:
        parts.append(f"**other {step['other_cpu_pct']:.0f}**" if step["other_cpu_pct"] >= 20
                     else f"other {step['other_cpu_pct']:.0f}")
    return " / ".join(parts)


def per_op_text(po: dict[str, Any]) -> str:
    parts = []
    if "redis_commands" in po:
        top = ", ".join(f"{k} {v:g}" for k, v in list(po["redis_by_command"].items())[:5])
        parts.append(f"Redis {po['redis_commands']:g} commands ({top})")
    if "commits" in po:
        parts.append(f"Postgres {po['commits']:g} commits + {po.get('rollbacks', 0):g} rollbacks, "
                     f"{po.get('wal_records', 0):g} WAL records ({po.get('wal_bytes', 0):,} bytes), "
                     f"{po.get('wal_fsyncs', 0):g} WAL fsyncs")
    return "; ".join(parts) or "—"


def step_table(s: dict[str, Any]) -> list[str]:
    lines = ["| step | load | ops/s | RPC | calls/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors "
             "| CPU % (of one core) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in s["steps"]:
        if st["mode"] == "open":
            load = f"{st['offered_per_s']:,.0f}/s offered"
        else:
            load = f"{st['users']} users" + (f", think {st['think_s']:g}s" if st["think_s"] else "")
        step = "max (closed)" if st.get("fraction") is None else f"{st['fraction']:.0%}"
        for i, (rpc, r) in enumerate(st["rpcs"].items()):
            head = (f"| {step} | {load} | {st['ops_per_s']:,.0f}" if i == 0 else "| | |")
            extra = f" shed {st['shed']}" if i == 0 and st["shed"] else ""
            if r["errors"] and r["ok"]:
                # overload: the calls that were served, apart from those refused or timed out
                extra += f" (OK p50 {r['ok_p50_ms']:.2f} / p99 {r['ok_p99_ms']:.2f} ms)"
            lines.append(
                f"{head} | {rpc} | {r['throughput_per_s']:,.0f} | {r['p50_ms']:.2f} | "
                f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | "
                f"{_errors(r['errors'])}{extra} | {_cpu(st) if i == 0 else ''} |")
    return lines


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def versus_section(result: dict[str, Any]) -> list[str]:
    """Ours against the Postgres-only peer: medians over the rounds, ratios, the proxy's cost."""
    v = result.get("versus")
    if not v:
        return []
    systems = v["systems"]
    peer = "peer" in systems
    out = [f"## Ours vs the Postgres-only peer — profile `{v['profile']}`, medians of "
           f"{v['rounds']} rounds" if peer else
           f"## Medians of {v['rounds']} rounds — profile `{v['profile']}`", ""]
    if peer:
        p = result.get("peer", {})
        out += [f"Peer: benchmarks/peer ({p.get('workers')} workers x {p.get('pool_size')} "
                f"connections{', outbox' if p.get('outbox') else ''}), database "
                f"`{p.get('database')}` on the same Postgres; rounds alternate which system goes "
                f"first. Echo max {_f(v.get('echo_per_s'), 0)}/s "
                f"({result.get('meta', {}).get('echo_workers', 1)} processes). Ratio = ours / peer (higher "
                "is better for throughput, lower for latency and CPU).", ""]
    head = "| scenario | figure | ours |" + (" peer | ours ÷ peer | target |" if peer else "") \
        + " ours ÷ echo |" + (" peer ÷ echo |" if peer else "") + " rounds |"
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in v["rows"]:
        nd = 0 if r["better"] == "higher" or r["metric"] == "units sold" else 2
        cells = [r["scenario"], r["metric"], _f(r.get("ours"), nd)]
        if peer:
            verdict = ""
            if "target" in r:
                verdict = f"≥ {r['target']:g}: {'pass' if r['pass'] else 'miss'}"
            cells += [_f(r.get("peer"), nd), _ratio(r.get("ratio")), verdict]
        cells.append(_ratio(r.get("ours_to_echo")))
        if peer:
            cells.append(_ratio(r.get("peer_to_echo")))
        rounds = "; ".join(", ".join(_f(x, nd) for x in r["rounds"].get(sy, [])) for sy in systems)
        cells.append(rounds)
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    cfg = result["meta"]["config"]
    if any(r["scenario"].startswith("flash") for r in v["rows"]) and cfg.get("flash_think_s"):
        offered = cfg["flash_users"] / cfg["flash_think_s"]
        out += [f"A flash sale offers at most {cfg['flash_users']} users / {cfg['flash_think_s']:g} s "
                f"think ≈ {offered:,.0f} attempts/s: a system that keeps up with that is not "
                "saturated, and its ratio of attempts/s is capped near 1 (--flash-think offers "
                "more).", ""]
    if v.get("proxy"):
        out += ["Latency proxy at each saturated step (its CPU is not counted as the system's; "
                "late: how much later than due the median and the 99th percentile chunk left, 25 µs buckets; "
                "routes the step did not use are left out):",
                "", "| scenario | system | round | proxy CPU % of a core | proxy CPU ms/op "
                "| chunks per op | late p50 / p99 µs |", "|---|---|---|---|---|---|---|"]
        for x in v["proxy"]:
            used = [k for k, c in x["chunks_per_op"].items() if c is not None and c >= 0.5]
            chunks = ", ".join(f"{k} {x['chunks_per_op'][k]}" for k in used)
            late = ", ".join(f"{k} {x['late_p50_us'].get(k) or 0:g} / {x['late_p99_us'].get(k) or 0:g}"
                             for k in used)
            out.append(f"| {x['scenario']} | {x['system']} | {x['round']} | {x['cpu_pct']:.1f} | "
                       f"{_f(x['cpu_ms_per_op'], 3)} | {chunks or '—'} | {late or '—'} |")
        out.append("")
    return out


def markdown(result: dict[str, Any]) -> str:
    m, t = result["meta"], result.get("targets", {})
    mc = m["machine"]
    cfg = m["config"]
    how = ("started by the harness: embedded Valkey + PostgreSQL, durable"
           if m.get("started_service") else "external")
    out = [f"# inventory-bench {m['date']}", "",
           f"Machine: {mc['cores']} cores, {mc['cpu']}, {mc['memory_gib']} GiB, Python {mc['python']}.",
           f"Command: `{m.get('command') or 'run_bench(...)'}`", "",
           f"Target {m.get('target')} ({how}); "
           f"{cfg['workers']} load processes x {cfg['channels']} channels; {cfg['duration_s']:g} s "
           f"per step after {cfg['warmup_s']:g} s warm-up; Zipf s={cfg['knobs']['zipf_s']} over "
           f"{m.get('universe', {}).get('skus')} SKUs; routing over "
           f"{m.get('universe', {}).get('route_locations')} locations; run {m.get('elapsed_s')} s.",
           "",
           f"Store latency profile: **{m.get('profile', 'localhost')}**"
           + (" (one-way delay added each way between each service and its store by a latency "
              "proxy)" if m.get("profile", "localhost") != "localhost" else "")
           + f"; {m.get('rounds', 1)} round(s)"
           + (f"; Postgres-only peer at {m['peer']['target']}" if m.get("peer") else "") + ".",
           "", *versus_section(result)]
    if result["anchors"]:
        out += ["## Anchors (same run, same box)", ""]
        for name, a in result["anchors"].items():
            out += [f"### {name}: max {a['max_ops_per_s']:,.0f} ops/s "
                    f"({', '.join(f'{k} {v:,.0f}/s' for k, v in a['max_rpc_per_s'].items())})", ""]
            out += [*step_table(a), ""]
    peer = result.get("peer", {}).get("scenarios", {})
    for name, s in result["scenarios"].items():
        for who, summary in (("", s), ("peer: ", peer.get(name))):
            if summary is None:
                continue
            rd = f" (round {summary['reported_round']}, the median)" \
                if "reported_round" in summary and len(summary["max_ops_per_s_by_round"]) > 1 else ""
            out += [f"## {who.capitalize()}Scenario `{name}`: max {summary['max_ops_per_s']:,.0f} "
                    f"operations/s{rd}", ""]
            out += [*step_table(summary), ""]
            if summary["steps"] and (po := summary["steps"][0].get("per_op")):
                out += [f"Store work per operation in the first step (background tasks included): "
                        f"{per_op_text(po)}.", ""]
    if t.get("throughput"):
        out += ["## Throughput against the anchors", "",
                "| RPC | measured by | max OK/s | echo max/s | ratio to echo | target | verdict "
                "| share of EVALSHA ops/s | share of PG tx/s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in t["throughput"]:
            verdict = ("pass" if r.get("pass") else f"miss by {r['short_by_pct']:.0f} %") \
                if "pass" in r else "—"
            out.append(f"| {r['rpc']} | `{r['scenario']}` | {r['max_ok_per_s']:,.0f} | "
                       f"{_f(r['echo_per_s'], 0)} | {_f(r.get('ratio_to_echo'), 2)} | "
                       f"≥ {r['target_ratio']:.2f} | {verdict} | {_f(r.get('ratio_to_redis_evalsha'), 3)}"
                       f" | {_f(r.get('ratio_to_pg_tx'), 2)} |")
        out += ["", "CPU cost per operation at the saturated step (ms of CPU, all processes), and the "
                "throughput that CPU cost allows on this box with nothing else running (robust to "
                "other work on a shared box):", "",
                "| RPC | service | postgres | redis | client | total | CPU-bound est./s "
                "| echo est./s | est. ratio to echo |", "|---|---|---|---|---|---|---|---|---|"]
        for r in t["throughput"]:
            c = r.get("cpu_ms_per_op") or {}
            out.append(f"| {r['rpc']} | {_f(c.get('service'), 2)} | {_f(c.get('postgres'), 2)} | "
                       f"{_f(c.get('redis'), 2)} | {_f(c.get('client'), 2)} | "
                       f"{_f(sum(c.values()) if c else None, 2)} | {_f(r['cpu_bound_est_per_s'], 0)} | "
                       f"{_f(r['echo_cpu_bound_est_per_s'], 0)} | {_f(r.get('est_ratio_to_echo'), 2)} |")
        out.append("")
    if t.get("p99_at_70pct"):
        out += [f"## p99 at 70 % of each scenario's maximum (target ≤ {P99_TARGET_MS:g} ms)", "",
                "| scenario | step | RPC | p99 ms | verdict |", "|---|---|---|---|---|"]
        for r in t["p99_at_70pct"]:
            verdict = "pass" if r["pass"] else f"miss by {r['over_by_ms']:.1f} ms"
            out.append(f"| {r['scenario']} | {r['load']} | {r['rpc']} | {r['p99_ms']:.2f} | {verdict} |")
        out.append("")
    inv = result.get("invariants") or {}
    out += ["## Invariant check (Postgres, after the run)", ""]
    if inv.get("ok") is None:
        out.append(f"skipped: {inv.get('skipped')}")
    else:
        out.append(f"**{'PASS' if inv['ok'] else 'FAIL'}** — {inv['stock_rows']:,} stock rows, "
                   f"{inv['movements']:,} ledger rows, reservations {inv['reservations']}: "
                   f"oversold (I1) {inv['oversold']}, reserved ≠ Σ ACTIVE lines (I2) "
                   f"{inv['reserved_mismatch']}, on_hand ≠ Σ ledger (I3) {inv['ledger_mismatch']}.")
        if fs := inv.get("flash_sale"):
            out.append(f"Flash sale: {fs['units_on_sale']} units on sale, {fs['reserved']} reserved, "
                       f"{fs['ok_answers']} OK answers (exact: {fs['exact']}).")
        out += flash_lines(inv)
        if rd := inv.get("redis"):
            out.append(f"Redis vs Postgres (I4, informational): {rd['rows_compared']:,} rows compared, "
                       f"{rd['differs']} differ, {rd['more_available_than_pg']} show more available "
                       f"than Postgres, {rd['not_hydrated']} SKUs not hydrated"
                       + (f"; {rd['persisting']} still differ {rd['persisting_after_s']:g} s later"
                          if "persisting" in rd else "") + ".")
    out.append("")
    if pinv := result.get("peer", {}).get("invariants"):
        out += ["## Invariant check of the peer's database", "",
                f"**{'PASS' if pinv['ok'] else 'FAIL'}** — {pinv['stock_rows']:,} stock rows, "
                f"{pinv['movements']:,} ledger rows, reservations {pinv['reservations']}: "
                f"oversold (I1) {pinv['oversold']}, reserved ≠ Σ ACTIVE lines (I2) "
                f"{pinv['reserved_mismatch']}, on_hand ≠ Σ ledger (I3) {pinv['ledger_mismatch']}.",
                *flash_lines(pinv), ""]
    for name, s in result["scenarios"].items():
        out += profile_section(name, s)
    return "\n".join(out) + "\n"


def flash_lines(inv: dict[str, Any]) -> list[str]:
    return [f"{f['label']}: {f['units_on_sale']} units on sale, {f['reserved']} reserved, "
            f"{f['ok_answers']} OK answers (exact: {f['exact']})." for f in inv.get("flash_sales", [])]


def profile_section(name: str, s: dict[str, Any]) -> list[str]:
    """py-spy of the service: self time by layer for every profiled step, functions at max."""
    steps = [st for st in s["steps"] if st.get("profile")]
    if not steps:
        return []
    heads = ["max" if st.get("fraction") is None else f"{st['fraction']:.0%}" for st in steps]
    layers: dict[str, list[float]] = {}
    for i, st in enumerate(steps):
        for layer, pct in st["profile"]["by_layer_self_pct"]:
            layers.setdefault(layer, [0.0] * len(steps))[i] = pct
    out = [f"## Where the service's time goes: `{name}` (py-spy, % of samples in Python)", "",
           "| layer (self time) | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for layer, row in sorted(layers.items(), key=lambda kv: -kv[1][0]):
        out.append(f"| {layer} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    out.append("| samples | " + " | ".join(str(st["profile"]["samples"]) for st in steps) + " |")
    top = steps[0]["profile"]
    out += ["", f"At {heads[0]}: service functions (inclusive) and hottest functions (self):", "",
            "| service function (inclusive) | % | function (self) | % |", "|---|---|---|---|"]
    inc, slf = top["top_inclusive_pct"][:12], top["top_self_pct"][:12]
    for i in range(max(len(inc), len(slf))):
        a = f"`{inc[i][0]}` | {inc[i][1]:.1f}" if i < len(inc) else " | "
        b = f"`{slf[i][0]}` | {slf[i][1]:.1f}" if i < len(slf) else " | "
        out.append(f"| {a} | {b} |")
    return [*out, ""]
