"""CPU an idle service costs: our service's processes and Postgres, with no calls at all.

    python -m benchmarks.idle_cpu [--seconds 10] [--settle 8] [--skus 300]
    (INVENTORY_WORKERS=N as for the service; INVENTORY_WATCH_IDLE_MS=10 for the old cadence)

Starts the harness's stack (embedded stores, the service on a small demo, no peer), waits
`--settle` seconds after it serves, then reads the CPU of the service's processes (the
supervisor and its workers, the stores excepted) and of every Postgres process `--seconds`
apart. What an idle service spends is its background: the WatchStock sequencer's passes, the
sweeper, the loop-lag probe, grpc's threads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.cpu_per_call import cpu, pg_cpu
from benchmarks.load import stack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=8.0)
    ap.add_argument("--skus", type=int, default=300)
    args = ap.parse_args()
    st = stack.LocalStack(skus=args.skus, log_dir=Path(tempfile.mkdtemp(prefix="idle-")),
                          peer=None)
    st.start()
    try:
        time.sleep(args.settle)  # the start's own work (demo load, warm-up) is not idling
        s0, p0 = cpu([st.service.pid]), sum(pg_cpu(st.database_url).values())
        time.sleep(args.seconds)  # the measured interval itself, not a synchronisation
        s1, p1 = cpu([st.service.pid]), sum(pg_cpu(st.database_url).values())
    finally:
        st.stop()
    share = 100 / args.seconds
    print(f"idle over {args.seconds:g} s: service {share * (s1 - s0):.1f} % of a core,"
          f" postgres {share * (p1 - p0):.1f} %")


if __name__ == "__main__":
    main()
