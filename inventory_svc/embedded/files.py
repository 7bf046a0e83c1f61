"""Files of ours in a data directory: passwords, logs, and the modes older versions left.

Data directories and files are readable by their owner only. Each server keeps a generated
password in a 0600 file of its data directory (reused across restarts; its URL carries it).
Secrets are written atomically, and no file is opened through a symlink (see _open_private).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from inventory_svc.embedded.errors import EmbeddedServerError

_LOG_TAIL_BYTES = 4000
_PASSWORD_BYTES = 32  # secrets.token_urlsafe(32): 256 random bits, 43 URL-safe characters
# What a password file may hold: URL-unreserved characters only, so the password goes into a URL,
# a Valkey config line and a SQL literal without any quoting; and not too short to guess.
_PASSWORD_RE = re.compile(r"[A-Za-z0-9._~-]{16,}")
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107


def _fits_unix_socket(path: Path) -> bool:
    """Whether a Unix socket can be bound at `path` (its bytes fit in sun_path)."""
    return len(os.fsencode(path)) <= _MAX_UNIX_SOCKET_PATH


# --------------------------------------------------------------------------------------------------
# logs


def _log_tail(path: Path, start: int) -> str:
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(start, size - _LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", errors="replace").strip()
    except OSError as exc:
        return f"(log unavailable: {exc})"


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------------
# private files and passwords


def _open_private(path: Path, flags: int) -> int:
    """Open (or create, 0600) a file of ours in a data directory and return its descriptor.

    Never through a symlink, and only a regular file that we own with a single link: as root, the
    in-place Postgres data directory belongs to the Postgres system user, who must not be able to
    point our log or password file at, say, /etc/shadow. Group/other bits left by older versions
    are removed.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise EmbeddedServerError(
                f"{path} is not a regular file owned by uid {os.geteuid()} with one link; "
                "refusing to use it"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_log(path: Path) -> int:
    """Open a server log for appending (0600); a log we may not use is replaced by a new one."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        return _open_private(path, flags)
    except (EmbeddedServerError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        # A symlink, a hard link or a file of another user where our log belongs: drop the name
        # (never its target) and start a new log.
        path.unlink(missing_ok=True)
        return _open_private(path, flags | os.O_EXCL)


def _write_private_file(path: Path, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """Atomically replace path by a 0600 file holding data (optionally chowned to owner).

    A temporary file (O_EXCL, no symlink followed) renamed over path: a crash never leaves a
    half-written secret, and a symlink planted at path is replaced, not followed.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _new_password() -> str:
    return secrets.token_urlsafe(_PASSWORD_BYTES)


def _read_password(path: Path) -> str | None:
    """The password kept in path, or None if there is no such file."""
    try:
        fd = _open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        password = fh.read().decode("ascii", "replace").strip()
    if not _PASSWORD_RE.fullmatch(password):
        raise EmbeddedServerError(
            f"{path} does not hold a usable password (16 or more of A-Z a-z 0-9 . _ ~ -); "
            "delete it to have a new one generated"
        )
    return password


def _tighten(path: Path) -> None:
    """Drop group/other bits of a file or directory of ours (left by older versions)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
