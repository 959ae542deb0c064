"""Atomic file writes for the state and checkpoint files: a reader (or a resumed run after a
crash) sees either the old file or the new one, never a half-written one."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Union

__all__ = ["write_atomic"]


def write_atomic(path: Union[str, os.PathLike], write: Callable[[str], None], *, prefix: str = ".gdc-") -> None:
    """Calls ``write(tmp)`` to write a temp file in ``path``'s folder, fsyncs it and renames it
    over ``path``; on any error the temp file is removed and the error re-raised. The temp file
    lives in the same folder so the rename stays on one file system (and is atomic)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
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
