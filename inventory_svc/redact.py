"""Passwords out of every log and error line: URLs keep their user, host and path, not the secret."""

from __future__ import annotations

import re

_USERINFO_SECRET = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")


def redact(text: str) -> str:
    """`scheme://user:secret@host` → `scheme://user:***@host`."""
    return _USERINFO_SECRET.sub(r"\g<scheme>\g<user>:***@", text)
