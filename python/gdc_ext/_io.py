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


# ------------------------------------------------------------------------------ side-data checksums
# (local imports: importing this module for write_atomic stays as light as before)
def _canonical_json(obj: object) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, ASCII (what the checksum covers)."""
    import json

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def json_with_checksum(payload: dict) -> dict:
    """``{"payload": payload, "sha256": ...}``: the sha256 of the payload's canonical JSON (sorted
    keys, no spaces), so that a file which parses but holds other values is refused by
    :func:`checked_json` (an edit that leaves the parsed values equal, such as ``1E-05`` for
    ``1e-05``, is harmless and passes)."""
    import hashlib

    return {"payload": payload, "sha256": hashlib.sha256(_canonical_json(payload)).hexdigest()}


def checked_json(obj: object, what: str) -> dict:
    """The payload of a :func:`json_with_checksum` dict after checking its sha256. Raises ValueError
    naming ``what`` (e.g. the file) when ``obj`` is not such a dict or the checksum differs."""
    import hashlib

    if not isinstance(obj, dict) or set(obj) != {"payload", "sha256"} or not isinstance(obj["payload"], dict) \
            or not isinstance(obj["sha256"], str):
        raise ValueError(f"{what} is damaged: expected a JSON object holding a 'payload' object and its 'sha256'")
    if hashlib.sha256(_canonical_json(obj["payload"])).hexdigest() != obj["sha256"]:
        raise ValueError(f"{what} is damaged: its sha256 does not match its content")
    return obj["payload"]


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(obj: object) -> str:
    """A sha256 (hex) of a nested structure of dicts (str keys), lists, tuples, None, bools, ints,
    floats, strings, NumPy scalars and torch tensors (dtype, shape and bytes; any device), e.g. a
    ``state_dict``. Equal structures give equal digests; a flipped bit in a tensor or any changed
    value gives another. Raises ValueError for any other type (nothing is pickled)."""
    import hashlib

    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: object) -> None:
    import math

    import numpy as np
    import torch

    # every item is tagged with its kind and length, so different structures never feed equal bytes
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(b"T" + _canonical_json([str(t.dtype), list(obj.shape), len(data)]) + data)
    elif isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise ValueError("sha256_of: dict keys must be strings")
        h.update(b"D%d:" % len(obj))
        for k in sorted(obj):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d:" % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, float):  # exact bits (hex), also for NaN and inf
        data = obj.hex().encode("ascii") if math.isfinite(obj) else repr(obj).encode("ascii")
        h.update(b"F%d:" % len(data) + data)
    elif obj is None or isinstance(obj, (bool, int, str)):
        data = _canonical_json(obj)
        h.update(b"S%d:" % len(data) + data)
    else:
        raise ValueError(f"sha256_of: cannot checksum a {type(obj).__name__}")
