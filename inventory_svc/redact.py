"""Passwords out of every log and error line: URLs keep their user, host and path, not the secret.

The embedded stores hand out ``redis://:PASSWORD@...`` and ``postgresql://user:PASSWORD@...``;
a URL must never reach a log, an error detail or a config message with its password in it.
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactingFilter", "redact"]

MASK = "***"

# scheme://[user]:SECRET@ -- a password written without percent-encoding may itself hold '@' or
# '/', and which '@' ends it is then ambiguous: the secret runs to the last '@' before the next
# blank or the next "://" (another URL). When in doubt this hides too much (the host of a URL
# with '@' in its query), never too little. Nothing is redacted without an '@'.
_USERINFO_SECRET = re.compile(
    r"(?P<prefix>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@]*:)"
    r"(?P<secret>(?:(?!://)\S)*)"
    r"(?P<at>@)"
)


def redact(text: str) -> str:
    """Mask the password of every URL in text.

    ``scheme://user:secret@host`` becomes ``scheme://user:***@host`` and ``redis://:secret@host``
    becomes ``redis://:***@host``; URLs without a password are left as they are.
    """
    return _USERINFO_SECRET.sub(rf"\g<prefix>{MASK}\g<at>", text)


class RedactingFilter(logging.Filter):
    """A filter that redacts URL passwords from every record it sees; it never drops a record.

    Attach it to handlers (``handler.addFilter(RedactingFilter())``), not to loggers: a logger's
    filters do not see the records propagated to it from its children. The message is formatted
    here (``msg % args``) and the result stored with ``args`` cleared, so no formatter can bring
    an argument's secret back; a traceback and stack text are formatted and redacted too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact record in place; always True."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: log it as written, args and all
            message = f"{record.msg} {record.args}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
