"""Service CPU per call, ours against the Postgres-only peer, in alternating rounds: a quick A/B.

    python -m benchmarks.cpu_per_call   (env: WHAT=reserve|loser|avail, C=32 callers, T=8 s a
                                         round, ROUNDS=3, SKUS=300, KEYS=1, PROFILE=file.raw)

Starts the harness's stack (embedded stores, our service with INVENTORY_WORKERS as set, the peer
with one process) on a small demo, and measures the CPU seconds of each service process (and its
children, the stores excepted) over a fixed-time closed loop. WHAT=loser reserves more than a SKU
holds (every call a flash sale's loser). PROFILE records our service with py-spy in round 2.
"""

import asyncio
import contextlib
import os
import random
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psutil

from benchmarks.load import stack
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as g

SKUS = int(os.environ.get("SKUS", "300"))
C = int(os.environ.get("C", "32"))
T = float(os.environ.get("T", "8"))
WHAT = os.environ.get("WHAT", "reserve")


def cpu(pids):
    s = 0.0
    for p in pids:
        try:
            t = psutil.Process(p).cpu_times()
            s += t.user + t.system
            for ch in psutil.Process(p).children(recursive=True):
                if "postgres" in ch.name() or "valkey" in ch.name():
                    continue
                t = ch.cpu_times()
                s += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return s


async def load(target, u, what):
    ch = grpc.aio.insecure_channel(target)
    stub = g.InventoryServiceStub(ch)
    n = 0
    stop = time.monotonic() + T
    rng = random.Random(1)
    skus = sorted(u.sku_locs)

    async def one():
        nonlocal n
        while time.monotonic() < stop:
            sku = rng.choice(skus)
            if what == "loser":
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Reserve(
                        api.ReserveRequest(
                            lines=[
                                pb.ReservationLine(
                                    sku=skus[0], location_id=u.sku_locs[skus[0]][0], quantity=10**9
                                )
                            ],
                            idempotency_key=uuid.uuid4().hex if os.environ.get("KEYS", "1") == "1" else "",
                            ttl_seconds=60,
                        )
                    )
            elif what == "reserve":
                loc = rng.choice(u.sku_locs[sku])
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Reserve(
                        api.ReserveRequest(
                            lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=1)],
                            idempotency_key=uuid.uuid4().hex,
                            ttl_seconds=60,
                        )
                    )
            else:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
            n += 1

    await asyncio.gather(*[one() for _ in range(C)])
    await ch.close()
    return n


def main():
    d = Path(tempfile.mkdtemp(prefix="cpub-"))
    st = stack.LocalStack(skus=SKUS, log_dir=d, peer=stack.PeerOptions())
    st.start()
    try:
        u = asyncio.run(stack.discover(st.target, SKUS, locations=20, seed=1))
        from inventory_svc.demo import load_demo

        asyncio.run(load_demo(st.peer_target, sku_count=SKUS))
        for name, t in (("ours", st.target), ("peer", st.peer_target)):
            asyncio.run(stack.restock(t, u, warehouse_units=10**7, store_units=10**6, key=f"r-{name}"))
        pids = {"ours": [st.service.pid], "peer": [st.peer.pid]}
        res = {"ours": [], "peer": []}
        for rnd in range(int(os.environ.get("ROUNDS", "3"))):
            order = ["ours", "peer"] if rnd % 2 == 0 else ["peer", "ours"]
            for name in order:
                tgt = st.target if name == "ours" else st.peer_target
                c0 = cpu(pids[name])
                t0 = time.monotonic()
                prof = None
                if os.environ.get("PROFILE") and name == "ours" and rnd == 1:
                    import subprocess

                    prof = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "-p",
                            str(pids[name][0]),
                            "--duration",
                            str(int(T) - 1),
                            "--rate",
                            "250",
                            "--format",
                            "raw",
                            "-o",
                            os.environ["PROFILE"],
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                n = asyncio.run(load(tgt, u, WHAT))
                if prof:
                    prof.wait()
                c1 = cpu(pids[name])
                el = time.monotonic() - t0
                res[name].append((n / el, 1000 * (c1 - c0) / n))
                print(f"{name}: {n / el:7.0f}/s  {1000 * (c1 - c0) / n:.3f} ms CPU/call", flush=True)
        for name, r in res.items():
            r.sort(key=lambda x: x[1])
            print(
                name, "median CPU ms/call", r[len(r) // 2][1], "calls/s", sorted(x[0] for x in r)[len(r) // 2]
            )
    finally:
        st.stop()


if __name__ == "__main__":
    main()
