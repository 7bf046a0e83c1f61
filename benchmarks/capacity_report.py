"""The report of benchmarks/capacity.py: its figures as Markdown tables (docs/CAPACITY.md quotes
them)."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def report(res: dict[str, Any], options: str, tables: Sequence[str], elapsed: float) -> str:
    """Markdown: the set-up's figures, then per phase CPU, WAL and Redis, and table growth."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    s, r, rc = res["setup"], res["setup"]["redis"], res["setup"]["reconcile"]
    pg = res["postgres"]
    out = [f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores, {cpu}, load "
           f"average {os.getloadavg()[0]:.1f} at the end; Python {platform.python_version()}; "
           f"Postgres {pg.get('server_version')} (fsync {pg.get('fsync')}, wal_compression "
           f"{pg.get('wal_compression')}); run {elapsed:.0f} s", f"options: {options}", "",
           f"Stock: {s['import_rows']:,} narrow rows by ImportStock in {s['import_s']:.1f} s "
           f"({s['import_rows'] / s['import_s']:,.0f} rows/s), {s['wide_rows']:,} wide rows by "
           f"INSERT: Postgres {s['stock_heap_per_row']:.0f} B heap + "
           f"{s['stock_index_per_row']:.0f} B indexes per stock row. Stock row updates over the "
           f"run: {s['stock_updates']['n_tup_upd']:,}, of which HOT (no index entry) "
           f"{s['stock_updates']['n_tup_hot_upd']:,}.", "",
           "| Redis | wide SKU (all locations) | narrow SKU (40 locations) |", "|---|---|---|",
           f"| fields per hash | {r['wide_fields']:.0f} | {r['narrow_fields']:.0f} |",
           f"| MEMORY USAGE per hash | {r['wide_hash_bytes']:,.0f} B | {r['narrow_hash_bytes']:,.0f} B |",
           f"| bytes per field | {r['wide_bytes_per_field']:.1f} | {r['narrow_bytes_per_field']:.1f} |",
           "", f"used_memory growth per field, all hashes: {r['used_memory_per_field']:.1f} B "
           f"(listpacks: hash-max-listpack-entries {r['listpack_limit']:.0f}). The wide hash as a "
           f"hashtable (past Redis' default 128): {r['wide_hashtable_bytes_per_field']:.1f} B per "
           f"field. A hold record: a hold key of one record {r['hold_key_one_record']} B, each "
           f"further record {r['hold_record_in_listpack']:.1f} B.", "",
           f"A full reconciler pass over {rc['rows']:,.0f} stock rows: {rc['seconds']:.1f} s; CPU "
           f"per stock row: reconciler {rc['client_us_per_row']:.1f} us, Postgres "
           f"{rc['postgres_us_per_row']:.1f} us, Redis {rc['redis_us_per_row']:.1f} us.", "",
           _row("phase", "calls", "calls/s", "errors", "CPU ms per call: service", "Postgres",
                "Redis", "client", "write tx per call", "calls per group"), "|---" * 10 + "|"]
    for p in res["phases"]:
        c = p["cpu_ms"]
        out.append(_row(p["name"], p["ops"], f"{p['ops'] / p['seconds']:,.0f}",
                        p["errors"] or "-", *(f"{c.get(k, 0):.3f}" for k in (
                            "service", "postgres", "redis", "client")), f"{p['xids']:.2f}",
                        ", ".join(f"{k} {v:.1f}" for k, v in p["groups"].items()) or "-"))
    out += ["", _row("phase", "WAL B per call (LSN)", "WAL records", "record bytes",
                     "records with full-page images (bytes)", "Redis commands per call"),
            "|---" * 6 + "|"]
    for p in res["phases"]:
        w = p["wal"]
        out.append(_row(p["name"], f"{p['wal_bytes']:,.0f}", f"{w['records']:.1f}",
                        f"{w['record_bytes']:,.0f}", f"{w['fpi']:.2f} ({w['fpi_bytes']:,.0f})",
                        ", ".join(f"{k} {v:.2f}" for k, v in sorted(p["redis_calls"].items())
                                  if v >= 0.01) or "-"))
    shown = [t for t in tables if t != "stock_changes"]
    out += ["", "Rows / heap bytes / index bytes per call, by table (growth of the relations; "
            "an update's old version counts until vacuum; stock: no row count):", "",
            _row("phase", *shown), "|---" * (len(shown) + 1) + "|"]
    for p in res["phases"]:
        if not p["name"].startswith("GetAvailability"):
            out.append(_row(p["name"], *(
                (f"{p['rows'][t]:.2f} / " if t in p["rows"] else "")
                + f"{p['heap_bytes'].get(t, 0):.0f} / {p['index_bytes'].get(t, 0):.0f}"
                for t in shown)))
    return "\n".join(out)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
