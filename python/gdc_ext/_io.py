"""Atomic file writes for the state and checkpoint files: a reader (or a resumed run after a
crash) sees either the old file or the new one, never a half-written one."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import tempfile
from typing import Callable, Union

__all__ = ["write_atomic", "fsync_dir", "remove_stale_temps"]

# Temp files are named ``.<target name><prefix><host>-<pid>-<random>.tmp`` in the target's folder, so a
# later save of the same target can tell a temp left by a killed writer (its pid is dead on this
# host) from one a live writer is still filling. <host> is a short hash of the host name: on a shared
# file system a pid says nothing about another machine's processes, whose temps are left alone.
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_MAX_BASE = 120  # file names are limited to 255 bytes: a long target name is cut in its temps' names


def _temp_stem(path: str, prefix: str) -> str:
    """The part of the temp names of ``path`` before ``<pid>-<random>.tmp``."""
    return f".{os.path.basename(path)[:_MAX_BASE]}{prefix}{_HOST}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():  # another thread of this process may be saving the same target
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        return True  # exists (another user's) or cannot be asked: keep its file
    return True


def remove_stale_temps(path: Union[str, os.PathLike], prefix: str = ".gdc-") -> list:
    """Removes the temp files of ``path`` (named as :func:`write_atomic` names them) whose writer
    process no longer exists on this host: what a save killed mid-write (kill -9, OOM) leaves
    behind, as large as the file itself. Temps of live writers, of other hosts and unrelated
    files are kept. Returns the removed paths; errors (a file removed meanwhile) are ignored."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    stem = _temp_stem(path, prefix)
    pattern = re.compile(re.escape(stem) + r"(\d+)-[A-Za-z0-9_]+\.tmp")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except OSError:
            pass
    return removed


def fsync_dir(folder: Union[str, os.PathLike]) -> None:
    """fsyncs a folder, so a rename into it survives a power loss. Skipped where folders cannot be
    opened (Windows) or fsynced (some file systems answer EINVAL); other errors are raised."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def write_atomic(path: Union[str, os.PathLike], write: Callable[[str], None], *, prefix: str = ".gdc-") -> None:
    """Calls ``write(tmp)`` to write a temp file in ``path``'s folder, fsyncs it, renames it over
    ``path`` and fsyncs the folder (so the rename itself is durable); on any error the temp file is
    removed and the error re-raised. The temp file lives in the same folder so the rename stays on
    one file system (and is atomic).

    Temp names are unique and carry the writer's pid (``.<name><prefix><host>-<pid>-XXXXXXXX.tmp``):
    before writing, temps of the same target left by writers that were killed mid-save are removed
    (:func:`remove_stale_temps`), so they do not pile up; a concurrent live writer's temp is kept."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(path, prefix)  # first: a killed save's temp may be what the disk needs for this one
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_stem(path, prefix)}{os.getpid()}-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
