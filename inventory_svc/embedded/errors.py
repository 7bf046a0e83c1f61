"""The one exception of the embedded servers (a RuntimeError: a broken setup, not a bad request)."""

from __future__ import annotations


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be prepared, started or stopped."""
