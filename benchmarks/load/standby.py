"""A synchronous standby for the harness's embedded Postgres (`--store-latency …,standby=1ms`).

Managed Postgres with high availability (a synchronous replica in another zone) makes every
commit wait until the replica has flushed the commit's WAL: 2-5 ms, against well under 1 ms on a
local disk. Row locks are held for that wait, so a design that commits once per call on a hot
row pays it once per call in a row, and one that commits a group of calls together pays it once
per group. A delay on the client's connection alone does not show this; a real replica behind
the latency proxy does.

The standby is a copy of the primary made by `pg_basebackup` through the proxy's `standby`
route, streaming from the primary through the same route (so each WAL chunk and each flush
acknowledgement takes the route's one-way delay); the primary then names it in
`synchronous_standby_names` (with `synchronous_commit` at its default, `on`: a commit waits for
the standby's flush).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import asyncpg

from inventory_svc.embedded import EmbeddedPostgres
from inventory_svc.embedded.files import _write_private_file

APPLICATION_NAME = "bench_standby"
BASEBACKUP_TIMEOUT_S = 300.0


class EmbeddedStandby(EmbeddedPostgres):
    """A streaming replica of an EmbeddedPostgres, copied from and following `source_port`
    (the primary, or the latency proxy in front of it), with the primary's superuser password
    (its roles come with the copy)."""

    def __init__(self, data_dir: Path, *, source_port: int, password: str) -> None:
        super().__init__(data_dir, durable=True)
        self._source_port = source_port
        self._source_password = password
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # read by _prepare, so it never sets a password of its own (the copy is read-only)
        _write_private_file(self.password_path, password.encode())

    def _initdb(self, bin_dir: Path) -> None:
        """The cluster is a base backup of the primary, set up to stream from it."""
        assert self._pgdata is not None
        scratch = self._pgdata.with_name(self._pgdata.name + ".basebackup")
        if scratch.exists():
            shutil.rmtree(scratch)
        try:
            self._run_logged(
                [str(bin_dir / "pg_basebackup"), "-D", str(scratch), "-h", "127.0.0.1",
                 "-p", str(self._source_port), "-U", "postgres", "-X", "stream",
                 "--checkpoint=fast", "-w"], BASEBACKUP_TIMEOUT_S, "pg_basebackup",
                # by environment, not on a command line that ps shows
                env=dict(os.environ, PGPASSWORD=self._source_password))
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        owner = (self._user.pw_uid, self._user.pw_gid) if self._user is not None else None
        _write_private_file(scratch / "standby.signal", b"", owner)
        conninfo = (f"host=127.0.0.1 port={self._source_port} user=postgres "
                    f"password={self._source_password} application_name={APPLICATION_NAME}")
        auto = (scratch / "postgresql.auto.conf").read_bytes()
        _write_private_file(scratch / "postgresql.auto.conf",
                            auto + f"primary_conninfo = '{conninfo}'\n".encode(), owner)
        os.replace(scratch, self._pgdata)

    def _set_password(self, bin_dir: Path, password: str) -> None:
        """Nothing to set: the roles and their passwords are the primary's."""


async def _alter_system(primary_url: str, statement: str, *, wait_s: float = 0.0) -> None:
    """Run an ALTER SYSTEM (a setting of the server, not of a session: the services' own
    connections must wait too) and reload; with `wait_s`, then wait on the same connection until
    the standby is synchronous."""
    conn = await asyncpg.connect(primary_url)
    try:
        await conn.execute(statement)
        await conn.execute("SELECT pg_reload_conf()")
        if not wait_s:
            return
        deadline = time.monotonic() + wait_s
        while (state := await conn.fetchval(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1",
                APPLICATION_NAME)) != "sync":
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the standby is not synchronous after {wait_s:g} s ({state})")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def make_synchronous(primary_url: str, timeout_s: float = 60.0) -> None:
    """Make the primary wait for the standby at every commit, once the standby streams."""
    asyncio.run(_alter_system(
        primary_url, f"ALTER SYSTEM SET synchronous_standby_names = '{APPLICATION_NAME}'",
        wait_s=timeout_s))


def make_asynchronous(primary_url: str) -> None:
    """Commits no longer wait for a standby: a data directory kept (--data-dir) and started
    later without one must not hang at its first commit."""
    asyncio.run(_alter_system(primary_url, "ALTER SYSTEM RESET synchronous_standby_names"))
