"""`inventory-bench`: load-test the service (or the embedded default it starts) and report."""

from __future__ import annotations

# isort: off
import inventory_svc  # noqa: F401  (first: turns gRPC's fork handlers off before gRPC starts)
# isort: on

import argparse
import shlex
import sys
from pathlib import Path

from benchmarks.load.runner import ALL_SCENARIOS, DEFAULT_SCENARIOS, BenchConfig, run_bench
from benchmarks.load.scenarios import Knobs

DESCRIPTION = """\
Drive the inventory service with a multi-process gRPC load generator and report, per RPC,
throughput, p50/p90/p99/p99.9 and errors by status code, beside anchors measured in the same run
(a bare grpc.aio echo server, the hold script by pipelined EVALSHA, a reserve-shaped Postgres
transaction), then check the invariants in Postgres. Without --target it starts the embedded
default itself (durable embedded Valkey + PostgreSQL, `inventory-svc serve --demo`).

find-max (default): per scenario a saturated closed-loop step (--concurrency users) gives the
maximum; open-loop steps at --fractions of it follow (the 70 % step is where p99 is judged).
Writes benchmarks/out/<timestamp>/{result.json,report.md,*.png} (or --out).

--peer also starts the Postgres-only peer (benchmarks/peer: the same protos, one conditional
UPDATE per Reserve) on its own database of the same Postgres, loads it by the same calls, and
measures ours and the peer in alternating rounds (--rounds, 3 by default with --peer); the
report gives every figure as the median over the rounds and as ratios ours / peer and to echo.
The peer runs availability, reserve, cart, hot-row, flash-sale and flash-hot; other scenarios run
on ours. hot-row is a flash sale while its stock lasts: every call reserves one unit of one SKU
at one warehouse that holds more than a run sells (every call a winner, every write on one row).
--store-latency postgres=1ms,redis=0.2ms puts a latency proxy between each service and its stores
(one-way delay, added each way: 1ms is a 2 ms longer round trip); the report names the profile.
Adding standby=1ms gives Postgres a real synchronous standby (pg_basebackup, streaming) behind
the proxy: every commit, ours and the peer's, waits ~3 ms for its flush, holding its row locks.
Both need the stack the harness starts (no --target).
"""

EPILOG = f"""scenarios: {", ".join(ALL_SCENARIOS)}
examples:
  inventory-bench                                   # everything, a few minutes
  inventory-bench --scenarios reserve,route --profile reserve,route
  inventory-bench --peer --scenarios reserve,flash-sale,flash-hot,cart,availability --fractions 0.7
  inventory-bench --peer --store-latency postgres=1ms,redis=0.2ms --scenarios reserve,flash-hot
  inventory-bench --peer --store-latency postgres=1ms,redis=0.2ms,standby=1ms --scenarios hot-row,flash-hot
  inventory-bench --target 127.0.0.1:50051 --database-url postgresql://postgres@127.0.0.1:5432/inventory \\
      --mode open --rate 500 --scenarios mixed --no-anchors
"""


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inventory-bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig()
    k = Knobs()
    a = p.add_argument
    a("--target", help="service address host:port (default: start the embedded default)")
    a("--database-url", help="Postgres of --target, for the invariant check and the PG anchor")
    a("--redis-url", help="Redis of --target, for the EVALSHA anchor and the Redis check")
    a("--scenarios", default=",".join(DEFAULT_SCENARIOS), help="comma-separated, or 'all'")
    a("--mode", choices=("find-max", "closed", "open"), default=d.mode)
    a("--rate", type=float, default=d.rate, help="open mode: operations/s (default %(default)s)")
    a("--concurrency", type=int, default=d.concurrency,
      help="closed mode / saturated step: virtual users (default %(default)s)")
    a("--fractions", default=",".join(f"{f:g}" for f in d.fractions),
      help="find-max: open-loop steps as fractions of the maximum (default %(default)s)")
    a("--duration", type=float, default=d.duration_s, help="seconds measured per step")
    a("--warmup", type=float, default=d.warmup_s, help="seconds before each step is measured")
    a("--drain", type=float, default=d.drain_s, help="seconds to let calls finish after a step")
    a("--workers", type=int, default=d.workers, help="load generator processes")
    a("--channels", type=int, default=d.channels, help="gRPC channels per worker")
    a("--skus", type=int, default=d.skus, help="demo SKUs (own service) and Zipf universe")
    a("--zipf", type=float, default=k.zipf_s, help="Zipf exponent of SKU popularity")
    a("--locations", type=int, default=d.locations,
      help="locations RouteAndReserve may use (others excluded; 0 = all)")
    a("--route-lines", type=int, default=k.route_lines, help="lines per order in `route`")
    a("--seed", type=int, default=d.seed)
    a("--timeout", type=float, default=k.timeout_s, help="per-call deadline, seconds")
    a("--no-keys", action="store_true", help="send mutating calls without idempotency keys")
    a("--no-anchors", action="store_true", help="skip the echo, EVALSHA and Postgres anchors")
    a("--no-restock", action="store_true", help="do not top the universe's stock up first")
    a("--unlimited-capacity", action=argparse.BooleanOptionalAction, default=None,
      help="daily shipment capacity 0 everywhere (default: only on the service it starts)")
    a("--flash-users", type=int, default=d.flash_users)
    a("--flash-skus", type=int, default=d.flash_skus)
    a("--flash-units", type=int, default=d.flash_units, help="units on sale per hot SKU")
    a("--flash-think", type=float, default=d.flash_think_s, help="mean seconds between a "
      "flash-sale user's attempts")
    a("--flash-duration", type=float, default=d.flash_duration_s)
    a("--max-outstanding", type=int, default=d.max_outstanding,
      help="open loop: calls in flight per worker before arrivals are shed")
    a("--noise-retries", type=int, default=d.noise_retries,
      help="re-measure a step up to N times while other processes on the box used more CPU "
           "than --noise-threshold (default %(default)s)")
    a("--noise-threshold", type=float, default=d.noise_threshold_pct,
      help="CPU %% of one core used by processes outside the run (default %(default)s)")
    a("--settle", type=float, default=d.settle_s,
      help="seconds to pause after each saturated step (default %(default)s)")
    a("--idle-wait", type=float, default=d.idle_wait_s,
      help="before each step wait up to S seconds for other work on the box to calm down")
    a("--poisson", action="store_true", help="open loop: Poisson arrivals, not evenly spaced")
    a("--peer", action="store_true",
      help="measure the Postgres-only peer too, in alternating rounds (harness's own stack)")
    a("--rounds", type=int, default=d.rounds,
      help="rounds of every scenario, medians reported (default: 3 with --peer, else 1)")
    a("--peer-pool", type=int, default=d.peer_pool,
      help="the peer's Postgres connections per worker (default %(default)s)")
    a("--peer-workers", type=int, default=d.peer_workers,
      help="the peer's processes; 0: as many as `inventory-svc serve` runs (default "
           "%(default)s: on a 2-core box one serves as much as two)")
    a("--peer-outbox", action="store_true",
      help="the peer also writes the RESERVATION outbox events ours writes")
    a("--store-latency", default=d.store_latency, metavar="PROFILE",
      help="one-way delay to the stores, e.g. postgres=1ms,redis=0.2ms (default: localhost); "
           "standby=1ms also gives Postgres a synchronous standby that far away, so every "
           "commit waits for it (managed Postgres with high availability)")
    a("--redis-cluster", type=int, default=d.redis_cluster, metavar="N",
      help="own stack: Redis is a local Redis Cluster of N masters (no EVALSHA anchor or Redis "
           "check then)")
    a("--stores-tcp", action="store_true",
      help="own stack: ours and the peer reach Redis and Postgres over TCP loopback, not over "
           "the Unix sockets `inventory-svc serve` uses for its embedded stores")
    a("--profile", default="", help="scenarios whose saturated step py-spy samples in the service")
    a("--out", type=Path, help="output directory (default benchmarks/out/<timestamp>)")
    a("--data-dir", type=Path, help="data of the embedded servers (default: a temporary dir)")
    a("--no-uvloop", action="store_true")
    a("--quiet", action="store_true", help="no progress line")
    return p


def config_from(args: argparse.Namespace, argv: list[str]) -> BenchConfig:
    scenarios = ALL_SCENARIOS if args.scenarios == "all" else _csv(args.scenarios)
    return BenchConfig(
        target=args.target, database_url=args.database_url, redis_url=args.redis_url,
        redis_cluster=args.redis_cluster, stores_tcp=args.stores_tcp,
        scenarios=scenarios, mode=args.mode, rate=args.rate, concurrency=args.concurrency,
        fractions=[float(x) for x in _csv(args.fractions)], duration_s=args.duration,
        warmup_s=args.warmup, drain_s=args.drain, workers=args.workers, channels=args.channels,
        skus=args.skus, locations=args.locations, seed=args.seed,
        knobs=Knobs(keys=not args.no_keys, zipf_s=args.zipf, route_lines=args.route_lines,
                    timeout_s=args.timeout),
        anchors=not args.no_anchors, restock=not args.no_restock,
        unlimited_capacity=args.unlimited_capacity, flash_users=args.flash_users,
        flash_skus=args.flash_skus, flash_units=args.flash_units, flash_think_s=args.flash_think,
        flash_duration_s=args.flash_duration, max_outstanding=args.max_outstanding,
        noise_retries=args.noise_retries, noise_threshold_pct=args.noise_threshold,
        idle_wait_s=args.idle_wait, settle_s=args.settle,
        poisson=args.poisson, peer=args.peer, rounds=args.rounds, peer_pool=args.peer_pool,
        peer_workers=args.peer_workers, peer_outbox=args.peer_outbox,
        store_latency=args.store_latency, profile=_csv(args.profile), out_dir=args.out,
        data_dir=args.data_dir, progress=not args.quiet, uvloop=not args.no_uvloop,
        command=shlex.join(["inventory-bench", *argv]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        cfg = config_from(args, argv)
        result = run_bench(cfg)
    except (ValueError, RuntimeError) as exc:
        print(f"inventory-bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    out = Path(result["out_dir"])
    print((out / "report.md").read_text())
    print(f"written: {out / 'result.json'}, {out / 'report.md'}"
          + "".join(f", {out / p}" for p in result.get("plots", [])))
    peer_ok = result.get("peer", {}).get("invariants", {}).get("ok")
    return 1 if result["invariants"].get("ok") is False or peer_ok is False else 0


if __name__ == "__main__":
    sys.exit(main())
