"""Named per-sample references saved in a CartoState file: an optional section of the file.

``CartoState.save(path, references={"crossfit": ref})`` stores each reference ([N] float64, the
loss of a model that did not train on the sample, nats per token) as one more tensor of the
same safetensors file, ``reference/<name>``, with the names, in the order given, in the file's
gdc_ext metadata (key ``references``). They are covered by the file's sha256 checksum and
written in the same atomic save, so a reference cannot drift from the state it was measured for;
:meth:`CartoState.load_references` reads them back (every value checked as ``check_reference``
checks a reference given by hand). A file without the key has no references: every file written
before them reads as before, and ``CartoState.load`` ignores the section (the state is the same).

Why a section of the state file rather than a ``CartoState`` attribute: the references are not
recorded state (nothing accumulates, folds, resets or is reduced across ranks), they are inputs
to scoring measured once; kept out of the in-memory state, they leave its ``state_dict``, its
device placement and its distributed checks unchanged, and ``CartoState.load`` keeps returning
just the state.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Dict, List, Mapping, Optional

import torch

__all__ = ["META_KEY", "PREFIX", "checked_references", "file_tensors", "check_meta_names", "layout",
           "stored_names", "read_references"]

META_KEY = "references"        # the gdc_ext metadata's list of stored reference names, in order
PREFIX = "reference/"          # tensor name prefix of a stored reference in the file
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NAME_RULE = "1-64 characters: letters, digits, '_', '.', '-', starting with a letter or digit"


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"references: a reference name must be a str of {_NAME_RULE}, got {name!r}")
    return name


def checked_references(references: Optional[Mapping], num_samples: int) -> Dict[str, torch.Tensor]:
    """``references`` ({name: [N] values} or None) checked before anything is written: names by
    :data:`_NAME_RULE`, values by ``check_reference`` (a 1-D [num_samples] array of finite
    losses). Returns {name: CPU float64 [N] tensor} in the given order; {} for None or {}."""
    from gdc_ext.state import check_reference

    if references is None:
        return {}
    if not isinstance(references, Mapping):
        raise ValueError(f"references must be a dict {{name: [N] per-sample reference losses}} or None, got "
                         f"{type(references).__name__}")
    out: Dict[str, torch.Tensor] = {}
    for name, values in references.items():
        _check_name(name)
        try:
            out[name] = check_reference(values, num_samples)
        except ValueError as e:
            raise ValueError(f"references[{name!r}]: {e}") from None
    return out


def file_tensors(references: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The file's tensors of checked references: ``reference/<name>`` -> contiguous float64 [N]."""
    return {PREFIX + name: t.contiguous() for name, t in references.items()}


def check_meta_names(meta: dict, bad) -> None:
    """Checks the metadata's optional reference names (absent: none); ValueError from ``bad``."""
    if META_KEY not in meta:
        return
    names = meta[META_KEY]
    if (not isinstance(names, list) or not all(isinstance(n, str) and _NAME.fullmatch(n) for n in names)
            or len(set(names)) != len(names)):
        raise bad(f"has damaged metadata: {META_KEY} must be a list of distinct names ({_NAME_RULE}), got {names!r}")


def layout(meta: dict) -> dict:
    """{tensor name: (dtype, shape)} of the references the (checked) metadata declares."""
    n = meta["num_samples"]
    return {PREFIX + name: (torch.float64, (n,)) for name in meta.get(META_KEY, [])}


def stored_names(path: str) -> Optional[List[str]]:
    """The reference names a state file declares, from its header alone (no checksum, no tensor
    read): whether :func:`read_references` has anything to read. None when the header is not
    readable as a state file's (the full read gives the precise error)."""
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                return None
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen > min(1 << 20, os.path.getsize(path) - 8):
                return None
            meta = json.loads(json.loads(fh.read(hlen).decode("utf-8"))["__metadata__"]["gdc_ext"])
        names = meta.get(META_KEY, [])
        return list(names) if isinstance(names, list) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
        return None


def read_references(path: str) -> Dict[str, torch.Tensor]:
    """{name: CPU float64 [N]} of the references stored in the state file at ``path``, in the
    order they were saved ({} for a file without). The whole file is read and checked as
    ``CartoState.load`` checks it (structure, sizes against the metadata, sha256 checksum); each
    reference is then checked as a given one would be (finite values). ValueError naming the file
    and the reference otherwise."""
    from gdc_ext._state_file import read_state_file
    from gdc_ext.state import check_reference

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CartoState.load_references: no state file at {path!r}")
    if stored_names(path) == []:  # a readable header without references (None: the full read says what is wrong)
        return {}
    meta, tensors = read_state_file(path)
    out = {}
    for name in meta.get(META_KEY, []):
        try:
            out[name] = check_reference(tensors[PREFIX + name], meta["num_samples"])
        except ValueError as e:
            raise ValueError(f"CartoState.load_references: {path!r}: the stored reference {name!r} is damaged or "
                             f"was written by a faulty writer: {e}") from None
    return out
