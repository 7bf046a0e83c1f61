"""Smoke test of the load harness (`inventory-bench`): its programmatic entry starts the embedded
default itself (tiny demo network), drives two scenarios for ~2 s each from a spawned worker
process, and writes a result with per-RPC statistics and a passing invariant check. No timings are
asserted: this is a benchmark's plumbing, not a benchmark."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.load.runner import BenchConfig, run_bench


def test_harness_runs_two_scenarios_and_checks_invariants(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_bench(BenchConfig(
        scenarios=["browse", "cart"], mode="closed", concurrency=8, duration_s=2.0, warmup_s=0.5,
        drain_s=5.0, workers=1, channels=1, skus=200, anchors=False, out_dir=out, progress=False))

    result = json.loads((out / "result.json").read_text())
    expected = {"browse": {"GetAvailability", "FindNearby"}, "cart": {"Reserve"}}
    for scenario, rpcs in expected.items():
        step = result["scenarios"][scenario]["steps"][0]
        assert rpcs <= set(step["rpcs"]), step["rpcs"].keys()
        for name, rpc in step["rpcs"].items():
            assert rpc["calls"] > 0, name
            assert {"throughput_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms"} <= set(rpc)
            assert isinstance(rpc["errors"], dict)
            assert rpc["ok"] + sum(rpc["errors"].values()) == rpc["calls"]
        assert not step["client_errors"], step["client_errors"]
    inv = result["invariants"]
    assert inv["ok"] is True, inv
    assert inv["oversold"] == inv["ledger_mismatch"] == inv["reserved_mismatch"] == 0
    assert inv["stock_rows"] > 0
