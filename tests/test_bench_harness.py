"""Smoke tests of the load harness (`inventory-bench`): its programmatic entry starts the embedded
default itself (tiny demo network), drives three scenarios for ~1.5 s each from a spawned worker
process, and writes a result with per-RPC statistics and a passing invariant check; with --peer
and --store-latency it measures ours and the Postgres-only peer behind the latency proxy. No
timings are asserted: this is a benchmark's plumbing, not a benchmark."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import asyncpg
import psutil
import pytest

from benchmarks.load import cli
from benchmarks.load.runner import BenchConfig, run_bench
from benchmarks.load.stack import LocalStack
from benchmarks.load.standby import APPLICATION_NAME
from inventory_svc.embedded import EmbeddedPostgres
from tests.faults.harness import eventually


@pytest.fixture(autouse=True)
def _no_shedding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service the harness starts takes its settings from the environment: no overload
    shedding, as for every test service (a busy CI box's late loop is not this test's subject)."""
    monkeypatch.setenv("INVENTORY_QUEUE_BUDGET_MS", "0")


def test_harness_runs_three_scenarios_and_checks_invariants(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_bench(BenchConfig(
        scenarios=["browse", "cart", "hot-row"], mode="closed", concurrency=8, duration_s=1.5,
        warmup_s=0.5, drain_s=5.0, workers=1, channels=1, skus=200, anchors=False, out_dir=out,
        progress=False))

    result = json.loads((out / "result.json").read_text())
    expected = {"browse": {"GetAvailability", "FindNearby"}, "cart": {"Reserve"},
                "hot-row": {"Reserve"}}
    for scenario, rpcs in expected.items():
        step = result["scenarios"][scenario]["steps"][0]
        assert rpcs <= set(step["rpcs"]), step["rpcs"].keys()
        for name, rpc in step["rpcs"].items():
            assert rpc["calls"] > 0, name
            assert {"throughput_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms"} <= set(rpc)
            assert isinstance(rpc["errors"], dict)
            assert rpc["ok"] + sum(rpc["errors"].values()) == rpc["calls"]
        assert not step["client_errors"], step["client_errors"]
    # hot-row: a fresh SKU at one warehouse with more than a run can sell, so every call won
    hot_row = result["scenarios"]["hot-row"]
    sku, _location = hot_row["hot"]
    assert sku.startswith("FLASH-"), hot_row["hot"]
    reserve = hot_row["steps"][0]["rpcs"]["Reserve"]
    assert reserve["calls"] > 0 and reserve["ok"] == reserve["calls"], reserve
    inv = result["invariants"]
    assert inv["ok"] is True, inv
    assert inv["oversold"] == inv["ledger_mismatch"] == inv["reserved_mismatch"] == 0
    assert inv["stock_rows"] > 0


def test_harness_measures_ours_against_the_peer_through_a_latency_proxy(tmp_path: Path) -> None:
    """`inventory-bench --peer --store-latency ...` end to end on a tiny configuration: both
    systems in alternating rounds behind the latency proxy, medians and ratios in the result
    and the report, the profile named, the proxy's CPU measured, both databases checked."""
    out = tmp_path / "out"
    profile = "postgres=1ms,redis=0.2ms"
    code = cli.main([
        "--peer", "--store-latency", profile, "--rounds", "2",
        "--scenarios", "reserve,flash-sale", "--mode", "closed",
        "--concurrency", "4", "--duration", "1.0", "--warmup", "0.5", "--workers", "1",
        "--channels", "1", "--skus", "100", "--no-anchors", "--quiet", "--out", str(out),
        "--peer-workers", "1", "--peer-pool", "4", "--flash-users", "30", "--flash-skus", "2",
        "--flash-units", "5", "--flash-think", "0.2", "--flash-duration", "1.5"])
    assert code == 0

    result = json.loads((out / "result.json").read_text())
    assert result["meta"]["profile"] == profile
    assert result["meta"]["store_latency_one_way_ms"] == {"postgres": 1.0, "redis": 0.2}
    assert [rd["order"] for rd in result["rounds"]] == [["ours", "peer"], ["peer", "ours"]]
    v = result["versus"]
    assert (v["systems"], v["rounds"], v["profile"]) == (["ours", "peer"], 2, profile)
    rows = {(r["scenario"], r["metric"]): r for r in v["rows"]}
    # (cart sessions against the peer: test_harness_runs_three_scenarios_and_checks_invariants
    # runs the scenario, test_peer the peer's Commit and Release)
    for key in (("reserve", "Reserve max OK/s"), ("flash-sale", "Reserve attempts/s"),
                ("reserve", "server CPU ms per call")):
        row = rows[key]
        assert len(row["rounds"]["ours"]) == len(row["rounds"]["peer"]) == 2, row
        assert row["ours"] > 0 and row["peer"] > 0, row
        assert row["ratio"] == pytest.approx(row["ours"] / row["peer"])
    assert rows[("reserve", "Reserve max OK/s")]["target"] == 2.0  # the network profile's

    for rd in result["rounds"]:
        for system, routes in (("ours", ("ours-redis", "ours-postgres")), ("peer", ("peer-postgres",))):
            for name, s in rd[system].items():
                step = s["steps"][0]
                assert step["system"] == system
                assert step["proxy"]["cpu_pct"] >= 0, step["proxy"]
                for route in routes:  # each system reached its stores through the proxy
                    assert step["proxy"]["routes"][route]["chunks_up"] > 0, (name, route)
                errors = {code for r in step["rpcs"].values() for code in r["errors"]}
                assert errors <= ({"FAILED_PRECONDITION"} if name == "flash-sale" else set()), \
                    (system, name, step["rpcs"])

    for inv in (result["invariants"], result["peer"]["invariants"]):
        assert inv["ok"] is True, inv
        assert inv["oversold"] == inv["ledger_mismatch"] == inv["reserved_mismatch"] == 0
        assert len(inv["flash_sales"]) == 2 and all(f["exact"] for f in inv["flash_sales"]), inv

    report = (out / "report.md").read_text()
    assert f"Ours vs the Postgres-only peer — profile `{profile}`" in report
    assert "| ours ÷ peer |" in report and "| peer ÷ echo |" in report
    assert "Latency proxy at each saturated step" in report
    assert "Invariant check of the peer's database" in report


def test_a_standby_profile_makes_every_commit_wait_for_the_standby() -> None:
    """`--store-latency standby=…`: Postgres gets a streaming standby behind the latency proxy,
    and a commit is not answered until the standby has it (a paused standby holds a commit in
    SyncRep); stopping the stack takes the setting back, so a kept data directory started alone
    later does not hang at its first commit."""
    data_dir = Path(tempfile.mkdtemp(prefix="inventory-bench-"))
    stack = LocalStack(skus=20, log_dir=data_dir / "log", data_dir=data_dir,
                       latency={"standby": 0.001})
    try:
        stack.start()
        assert "standby" in stack.pids()
        asyncio.run(_commits_wait_for(stack))
    finally:
        stack.stop()
    try:
        alone = EmbeddedPostgres(data_dir / "postgres", durable=True)
        asyncio.run(_no_standby_named(alone.start(timeout=60)))
        alone.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def _commits_wait_for(stack: LocalStack) -> None:
    primary = await asyncpg.connect(stack.database_url)
    writer = await asyncpg.connect(stack.database_url)
    try:
        assert await primary.fetchval(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1",
            APPLICATION_NAME) == "sync"
        await primary.execute("CREATE TABLE standby_probe (x int)")
        standby = psutil.Process(stack.standby.pid)
        paused = [standby, *standby.children(recursive=True)]
        for p in paused:
            p.suspend()
        try:
            commit = asyncio.create_task(writer.execute("INSERT INTO standby_probe VALUES (1)"))
            backend = writer.get_server_pid()

            async def waits_for_the_standby() -> bool:
                return await primary.fetchval(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = $1", backend) == "SyncRep"

            await eventually(waits_for_the_standby, within=30,
                             what="the commit's backend waiting for the standby (SyncRep)")
            assert not commit.done()
        finally:
            for p in paused:
                p.resume()
        await asyncio.wait_for(commit, 60)
        replica = await asyncpg.connect(stack.standby.url)
        try:
            assert await replica.fetchval("SELECT pg_is_in_recovery()") is True

            async def replayed() -> bool:  # flushed there before the commit was answered
                return await replica.fetchval("SELECT to_regclass('standby_probe')") is not None \
                    and await replica.fetchval("SELECT count(*) FROM standby_probe") == 1

            await eventually(replayed, within=30, what="the committed row on the standby")
        finally:
            await replica.close()
    finally:
        await writer.close()
        await primary.close()


async def _no_standby_named(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SHOW synchronous_standby_names") == ""
        await conn.execute("CREATE TABLE after_the_run (x int)")  # a commit: answered
    finally:
        await conn.close()
