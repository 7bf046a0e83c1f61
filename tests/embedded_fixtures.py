"""Fixtures of the tests that start embedded servers themselves: a data directory and a
teardown that kills what a test started, even when it fails."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from inventory_svc.embedded import EmbeddedPostgres, EmbeddedRedis

S = TypeVar("S", EmbeddedRedis, EmbeddedPostgres)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh directory for server data.

    Not tmp_path: any pytest session starting on the machine resets /tmp/pytest-of-<user> to 0700,
    which cuts the unprivileged postgres user (tests run as root) off from its data mid-test.
    """
    path = Path(tempfile.mkdtemp(prefix="inventory-test-data-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def track(data_dir: Path) -> Iterator[Callable[[S], S]]:
    """Register servers to be killed at teardown (before data_dir is removed), even on failure."""
    servers: list[EmbeddedRedis | EmbeddedPostgres] = []

    def add(server: S) -> S:
        servers.append(server)
        return server

    yield add
    for server in servers:
        server.kill()
