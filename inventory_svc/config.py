"""Configuration from INVENTORY_* environment variables, validated at start (DESIGN §6)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and the value."""


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = ""  # empty: start the embedded Redis-compatible server
    redis_cluster: bool = False
    database_url: str = ""  # empty: start the embedded Postgres
    data_dir: Path = Path(".data")
    host: str = "127.0.0.1"
    port: int = 50051
    # Serving processes on the port (SO_REUSEPORT), each with its own event loop and pools;
    # 0: one per CPU this process may use (affinity and cgroup quota, inventory_svc/cpus.py).
    workers: int = 0
    metrics_port: int = 0  # 0: no metrics HTTP endpoint
    metrics_host: str = "127.0.0.1"  # metrics have their own bind address, loopback by default
    default_ttl_s: int = 900
    min_ttl_s: int = 1
    max_ttl_s: int = 86_400
    max_lines: int = 200
    max_skus_per_read: int = 1_000
    sweep_interval_s: float = 1.0
    sweep_batch: int = 200
    reconcile_interval_s: float = 30.0
    # Passes in between look only at rows changed since a pass at least reconcile_seq_window_s
    # ago (by then every transaction that took a smaller seq has ended: twice hold_timeout_s by
    # default; only a bulk import runs longer, and it publishes its own levels), and at SKUs
    # with holds in flight; every this many passes (~1 h by default) one looks at everything:
    # a full pass costs ~20 µs of CPU a stock row (docs/CAPACITY.md), so with a large catalogue
    # make it rarer (2880: daily).
    reconcile_full_every: int = 120
    reconcile_seq_window_s: float = 20.0
    # Postgres connections a process keeps, in all: group_pool_size of them are the group
    # committers' own (their statements' plans cached: storage/pg_base.py), the rest serve
    # everything else
    pg_pool_min: int = 2
    pg_pool_max: int = 20
    # connections a process keeps to Redis (one server; a cluster client pools per node): past
    # it a command waits for one, up to redis_timeout_s
    redis_pool_max: int = 100
    # the calls' scripts and reads through one pipelined connection a worker (one server over
    # plain TCP, tracing off; storage/redis_mux.py); false: through redis-py's pool, as before
    redis_mux: bool = True
    pg_timeout_s: float = 5.0
    # Reserve calls committed together in one transaction (app/group_commit.py), and Commit /
    # Release calls likewise (app/group_settle.py): at most this many a group; one group of each
    # in Postgres at a time, another (up to this many lanes each) when every group there has been
    # there for stall_ms.
    group_commit_max: int = 64
    # a group of plain reservations first tries one statement that locks, checks and writes
    # outside a transaction (storage/pg_group.reserve_at_once); false: always the transaction
    group_commit_one_statement: bool = True
    group_commit_lanes: int = 4
    group_commit_stall_ms: float = 20.0
    redis_timeout_s: float = 2.0
    max_concurrent_rpcs: int = 2_000
    shutdown_grace_s: float = 10.0
    # On SIGTERM, health says NOT_SERVING at once and the calls that still come are served for
    # this long before the server stops taking them: grpc's stop cancels a call that arrived but
    # was not picked up yet (CANCELLED, though it never ran), so clients and load balancers must
    # have moved away first. A client health-checking its replicas moves within a turn; behind
    # a Kubernetes Service, endpoint removal takes seconds (k8s/deployment.yaml sets 5).
    shutdown_delay_s: float = 1.0
    # Who may call (docs/SECURITY.md): "key:role[:LOC|PREFIX*...],..." and/or a TOML file of
    # principals. Neither: every call is an anonymous admin, allowed on loopback only.
    api_keys: str = ""
    principals_file: str = ""
    # TLS: server certificate and key (PEM files); with a client CA, client certificates are
    # required and their identities map to principals (mTLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    allow_insecure: bool = False  # serve a non-loopback address without TLS or principals
    health_port: int = 0  # a plaintext, health-only listener (kubelet probes); 0: none
    # Admission (docs/SECURITY.md): limits that hold before a request is decoded or worked on.
    max_message_bytes: int = 4 * 1024 * 1024
    # A client opening more streams than this before it has read the server's HTTP/2 settings
    # has the rest refused (REFUSED_STREAM: UNAVAILABLE): a cap, but above any burst of a
    # legitimate client.
    max_streams_per_connection: int = 1_000
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 1800.0
    max_connection_age_grace_s: float = 30.0
    max_ids_per_read: int = 1_000
    import_max_rows: int = 2_000_000
    import_max_bytes: int = 512 * 1024 * 1024
    import_timeout_s: float = 600.0
    routing_concurrency: int = 2  # solver runs at once, each in a worker thread
    # Overload: while calls wait longer than this before the service takes them
    # (transport/overload.py), new calls are refused at once (RESOURCE_EXHAUSTED + RetryInfo)
    # instead of queueing; 0 turns shedding off.
    queue_budget_ms: float = 100.0
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one JSON object per line
    # OpenTelemetry tracing (inventory_svc/tracing.py, the `tracing` extra): "" off, "otlp" to a
    # collector (OTEL_EXPORTER_OTLP_* say where), "console" to stderr; the share of new traces kept
    tracing: str = ""
    tracing_sample: float = 1.0
    demo_skus: int = 10_000  # size of the network `serve --demo` loads
    split_penalty: float = 5.0  # routing: default cost of each extra location in a plan
    route_attempts: int = 3  # RouteAndReserve re-routes this often when stock moves under it
    # WatchStock (docs/WATCH.md): the sequencer's pass interval, and its longest pause once passes
    # find nothing (never shorter than the interval; a commit of the service wakes it at once);
    # how often a process looks for new events without a NOTIFY; a stream's heartbeat when idle;
    # how many events may be taken while a caught-up stream's write waits before it is cut off;
    # the latest events each process keeps in memory; streams a process serves; how often it
    # records their positions.
    watch_sequence_ms: float = 10.0
    watch_idle_ms: float = 50.0
    watch_poll_s: float = 1.0
    watch_heartbeat_s: float = 5.0
    watch_buffer: int = 10_000
    watch_ring: int = 10_000
    watch_max_streams: int = 1_000
    watch_cursor_interval_s: float = 5.0
    # Retention (app/retention.py): a run every retention_interval_s, retention_batch rows a
    # statement; windows in hours, but capacity_usage's in days (its rows are one a day).
    retention_interval_s: float = 60.0
    retention_batch: int = 1_000
    retain_idempotency_h: float = 72.0
    retain_events_h: float = 168.0
    retain_outbox_h: float = 168.0
    retain_reservations_h: float = 2160.0
    retain_capacity_days: int = 35
    # The key filter (storage/redis_keys.py): bits of each of its buckets (a third of
    # retain_idempotency_h each; up to 7 live at once); 0: none, every keyed loser asks Postgres
    key_filter_bits: int = 2**25

    @property
    def hold_timeout_s(self) -> float:
        """How long a Redis hold may wait for its Postgres commit: the call gives up after it,
        and the reconciler treats an older hold record without a reservation as an orphan."""
        return 2 * self.pg_timeout_s

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            name = "INVENTORY_" + f.name.upper()
            if name not in env:
                continue
            raw = env[name]
            values[f.name] = _parse(name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    @property
    def group_pool_size(self) -> int:
        """The group committers' own connections, of pg_pool_max: one for each group that may
        be in Postgres at once (lanes of reservations and of commits/releases), but at most half
        the pool, so that everything else keeps enough when the pool is small."""
        return min(2 * self.group_commit_lanes, self.pg_pool_max // 2)

    def validate(self) -> None:
        def need(ok: bool, name: str, value: object, rule: str) -> None:
            if not ok:
                raise ConfigError(f"INVENTORY_{name.upper()}={value!r}: {rule}")

        need(0 < self.port < 65536 or self.port == 0, "port", self.port, "must be a TCP port")
        need(self.workers >= 0, "workers", self.workers,
             "must be >= 0 (0: one per usable CPU)")
        need(1 <= self.min_ttl_s <= self.default_ttl_s <= self.max_ttl_s, "default_ttl_s",
             self.default_ttl_s, "need 1 <= MIN_TTL_S <= DEFAULT_TTL_S <= MAX_TTL_S")
        need(self.max_lines >= 1, "max_lines", self.max_lines, "must be >= 1")
        need(self.sweep_interval_s > 0, "sweep_interval_s", self.sweep_interval_s, "must be > 0")
        need(self.reconcile_interval_s > 0, "reconcile_interval_s", self.reconcile_interval_s,
             "must be > 0")
        need(self.reconcile_full_every >= 1, "reconcile_full_every", self.reconcile_full_every,
             "must be >= 1")
        need(self.reconcile_seq_window_s >= 0, "reconcile_seq_window_s",
             self.reconcile_seq_window_s, "must be >= 0")
        need(self.redis_pool_max >= 1, "redis_pool_max", self.redis_pool_max, "must be >= 1")
        need(1 <= self.pg_pool_min <= self.pg_pool_max, "pg_pool_max", self.pg_pool_max,
             "need 1 <= PG_POOL_MIN <= PG_POOL_MAX")
        need(self.group_commit_max >= 1, "group_commit_max", self.group_commit_max,
             "must be >= 1")
        need(self.group_commit_lanes >= 1 and 2 * self.group_commit_lanes < self.pg_pool_max,
             "group_commit_lanes", self.group_commit_lanes,
             "need 1 <= GROUP_COMMIT_LANES and 2 x GROUP_COMMIT_LANES < PG_POOL_MAX (lanes of"
             " reservations and of commits/releases each have a connection of their own)")
        need(self.group_commit_stall_ms > 0, "group_commit_stall_ms", self.group_commit_stall_ms,
             "must be > 0")
        need(self.log_format in ("text", "json"), "log_format", self.log_format,
             "must be text or json")
        need(0 <= self.metrics_port < 65536, "metrics_port", self.metrics_port,
             "must be a TCP port, or 0 for no metrics endpoint")
        need(0 <= self.health_port < 65536, "health_port", self.health_port,
             "must be a TCP port, or 0 for none")
        for name in ("max_message_bytes", "max_streams_per_connection", "max_ids_per_read",
                     "import_max_rows", "import_max_bytes", "routing_concurrency"):
            need(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        need(self.queue_budget_ms >= 0, "queue_budget_ms", self.queue_budget_ms, "must be >= 0")
        need(self.key_filter_bits == 0 or 2**10 <= self.key_filter_bits <= 2**32,
             "key_filter_bits", self.key_filter_bits,
             "must be 0 (no key filter) or from 1024 to 2^32 (Redis's largest bitmap)")
        need(self.shutdown_delay_s >= 0, "shutdown_delay_s", self.shutdown_delay_s,
             "must be >= 0")
        need(self.tracing in ("", "otlp", "console"), "tracing", self.tracing,
             "must be empty (off), otlp or console")
        need(0.0 <= self.tracing_sample <= 1.0, "tracing_sample", self.tracing_sample,
             "must be a ratio from 0 to 1")
        if self.tracing:  # only then: with tracing off, OpenTelemetry is never imported
            from inventory_svc.tracing import missing

            problem = missing(self.tracing)
            need(problem is None, "tracing", self.tracing, problem or "")
        for name in ("watch_sequence_ms", "watch_idle_ms", "watch_poll_s", "watch_heartbeat_s",
                     "watch_cursor_interval_s", "retention_interval_s", "retain_idempotency_h",
                     "retain_events_h", "retain_outbox_h", "retain_reservations_h",
                     "retain_capacity_days"):
            need(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        for name in ("watch_buffer", "watch_ring", "watch_max_streams", "retention_batch"):
            need(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        for name in ("max_connection_idle_s", "max_connection_age_s",
                     "max_connection_age_grace_s", "import_timeout_s"):
            need(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        need(bool(self.tls_cert) == bool(self.tls_key), "tls_key", "…",
             "INVENTORY_TLS_CERT and INVENTORY_TLS_KEY go together")
        need(not self.tls_client_ca or bool(self.tls_cert), "tls_client_ca", self.tls_client_ca,
             "client certificates (mTLS) need INVENTORY_TLS_CERT and INVENTORY_TLS_KEY")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "principals_file"):
            path = getattr(self, name)
            need(not path or Path(path).is_file(), name, path, "no such file")
        from inventory_svc.transport.principals import load_principals

        try:
            registry = load_principals(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.allow_insecure and not _is_loopback(self.host):
            need(bool(self.tls_cert), "host", self.host,
                 "a non-loopback address needs TLS (INVENTORY_TLS_CERT/_KEY); "
                 "set INVENTORY_ALLOW_INSECURE=true to serve plaintext anyway")
            need(not registry.open, "host", self.host,
                 "a non-loopback address needs principals (INVENTORY_API_KEYS, "
                 "INVENTORY_PRINCIPALS_FILE or mTLS identities); "
                 "set INVENTORY_ALLOW_INSECURE=true to serve it open anyway")
        for url, name, schemes in (
            (self.redis_url, "redis_url", ("redis://", "rediss://", "unix://")),
            (self.database_url, "database_url", ("postgres://", "postgresql://")),
        ):
            need(not url or url.startswith(schemes), name, _scheme_only(url),
                 f"must start with {schemes}")


_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,31}://")


def _scheme_only(url: str) -> str:
    """What the error about a store URL with the wrong scheme shows: the scheme, never the rest.
    A malformed value (a libpq `host=... password=...` string, a password with an unescaped / or
    @) is no URL whose secret redact() could find, so none of it is printed."""
    found = _SCHEME_RE.match(url)
    return f"{found.group()}…" if found else "…"


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse(name: str, raw: str, type_: object) -> object:
    kind = str(type_)
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a {kind}") from None
