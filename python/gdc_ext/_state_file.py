"""The CartoState file format: a safetensors file with a sha256 checksum over every byte.

A state file is a safetensors file (8-byte little-endian header length, JSON header, tensor bytes)
written here rather than by safetensors.save_file so that the checksum can cover every byte: the
metadata holds the sha256 of the whole file in which the 64 hex digits of the checksum itself read
as zeros. Any flipped byte, in the length, the header (tensor table, metadata, padding) or the data,
then fails the check (or an earlier structural one). Reading parses the header itself to check the
declared sizes against the metadata and the file before allocating, and reads each tensor once,
with no pickle and no mmap. An optional section holds named per-sample references
(``reference/<name>`` tensors, their names in the metadata's ``references``; gdc_ext._state_references):
absent from files without references, so every older file reads as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import warnings

import numpy as np
import torch

from gdc_ext import _state_references, layout
from gdc_ext._state_legacy import LEGACY_VERSIONS, legacy_shapes

__all__ = ["FORMAT_VERSION", "read_state_file", "write_state_file"]

# Version 3: the compact layout of csrc/state_stats.def (float32 folded statistics, int16 counters,
# the columns listed in the metadata), checksummed like version 2. Version 2 files carry a sha256
# checksum (metadata key _CHECKSUM_KEY) over the float64 / int32 layout of gdc_ext before the
# compact one; version 1 files (that layout, no checksum) are still read, with a warning that damage
# to them cannot be detected. Both are converted to the current layout by CartoState.load
# (gdc_ext._state_legacy).
FORMAT_VERSION = 3
_READABLE_VERSIONS = (*LEGACY_VERSIONS, FORMAT_VERSION)

_META_KEY = "gdc_ext"
_CHECKSUM_KEY = "gdc_ext_sha256"
_MAX_HEADER = 1 << 20  # a state's header is < 1 kB; a larger length field is damage, not a state
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "I32": torch.int32, "I16": torch.int16, "I64": torch.int64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_LITTLE = sys.byteorder == "little"


def _checksum_field(hexdigest: str) -> bytes:
    return f'"{_CHECKSUM_KEY}":"{hexdigest}"'.encode()


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's little-endian bytes (no copy on little-endian hosts)."""
    a = t.numpy()
    if not _LITTLE:
        a = a.byteswap()
    return memoryview(a).cast("B")


def write_state_file(path: str, tensors: dict, meta_json: str) -> None:
    """Writes ``tensors`` (CPU, contiguous) and the metadata as a safetensors file with the checksum."""
    # largest items first, then by name (as safetensors orders them): every tensor starts aligned
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    table, offset = {}, 0
    for n in names:
        t = tensors[n]
        size = t.numel() * t.element_size()
        table[n] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    zero = "0" * 64
    header = json.dumps({"__metadata__": {_META_KEY: meta_json, _CHECKSUM_KEY: zero}, **table},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    prefix = struct.pack("<Q", len(header))
    h = hashlib.sha256(prefix)
    h.update(header)
    for n in names:
        h.update(_as_bytes(tensors[n]))
    header = header.replace(_checksum_field(zero), _checksum_field(h.hexdigest()))
    with open(path, "wb") as fh:
        fh.write(prefix)
        fh.write(header)
        for n in names:
            fh.write(_as_bytes(tensors[n]))


def read_state_file(path: str):
    """(meta dict, {name: CPU tensor}) of a state file, every check before any tensor is allocated;
    ValueError naming the file for anything wrong."""
    def bad(why: str) -> ValueError:
        return ValueError(f"CartoState.load: {path!r} {why}")

    file_size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as fh:
        prefix = _read_exact(fh, 8)
        if len(prefix) < 8:
            raise bad(f"is not a readable safetensors state file (only {file_size} bytes)")
        (hlen,) = struct.unpack("<Q", prefix)
        if hlen > min(_MAX_HEADER, file_size - 8):
            raise bad(f"is not a readable safetensors state file (damaged or truncated: its header length field "
                      f"says {hlen} bytes, the file has {file_size})")
        header = _read_exact(fh, hlen)
        try:
            table = json.loads(header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"is not a readable safetensors state file (damaged header: {e})") from None
        if not isinstance(table, dict):
            raise bad("is not a readable safetensors state file (damaged header: not a JSON object)")
        file_meta = table.pop("__metadata__", None)
        raw_meta = file_meta.get(_META_KEY) if isinstance(file_meta, dict) else None
        if not isinstance(raw_meta, str):
            raise bad("has no gdc_ext metadata: not a CartoState file")
        meta = _parse_meta(raw_meta, bad)
        if meta["version"] >= 2:
            checksum = file_meta.get(_CHECKSUM_KEY)
            if not isinstance(checksum, str) or len(checksum) != 64 or not all(c in "0123456789abcdef" for c in checksum):
                raise bad(f"is damaged: its checksum is missing or malformed ({checksum!r})")
            if header.count(_checksum_field(checksum)) != 1:
                raise bad("is damaged: its checksum field is not where it was written")
            h = hashlib.sha256(prefix)
            h.update(header.replace(_checksum_field(checksum), _checksum_field("0" * 64)))
        else:
            checksum, h = None, None
        layout = _expected_layout(meta)
        order = _check_table(table, layout, file_size - 8 - hlen, bad)
        tensors = {}
        for name in order:  # file order: the data is read sequentially
            dtype, shape = layout[name]
            t = torch.empty(shape, dtype=dtype)
            view = memoryview(t.numpy()).cast("B")
            if _readinto_full(fh, view) != len(view):
                raise bad("is truncated (it was shorter while reading than when checked)")
            if h is not None:
                h.update(view)
            if not _LITTLE:
                t.numpy().byteswap(inplace=True)
            tensors[name] = t
    if h is not None and h.hexdigest() != checksum:
        raise bad("is damaged: its sha256 checksum does not match its contents (a changed byte in the file)")
    if checksum is None:
        warnings.warn(f"CartoState.load: {path!r} was saved by an older gdc_ext (format version 1) without a "
                      f"checksum: it is loaded, but damage to it cannot be detected; save it again to add one",
                      UserWarning, stacklevel=3)
    if tensors["eps"].tolist() != [float(e) for e in meta["eps"]]:
        raise bad(f"is damaged: its eps tensor {tensors['eps'].tolist()} differs from its metadata {meta['eps']}")
    return meta, tensors


def _read_exact(fh, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = fh.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _readinto_full(fh, view: memoryview) -> int:
    """readinto until ``view`` is full or the file ends (large reads can return early)."""
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _parse_meta(raw: str, bad) -> dict:
    """The gdc_ext metadata, every field checked (ValueError from ``bad`` otherwise)."""
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise bad(f"has corrupted metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "gdc_ext.CartoState":
        raise bad("has no gdc_ext.CartoState metadata: not a CartoState file (or its metadata is damaged)")
    version = meta.get("version")
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
        raise bad(f"has format version {version!r}; this gdc_ext reads versions "
                  f"{', '.join(map(str, _READABLE_VERSIONS))}")

    def positive_int(key):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(f"has damaged metadata: {key} must be a positive int, got {v!r}")

    positive_int("num_samples")
    positive_int("burn_in")
    eps = meta.get("eps")
    if not isinstance(eps, list) or not eps or not all(_positive_finite(e) for e in eps):
        raise bad(f"has damaged metadata: eps must be a non-empty list of positive finite floats, got {eps!r}")
    for key in ("eps_scalar", "extras"):
        if not isinstance(meta.get(key), bool):
            raise bad(f"has damaged metadata: {key} must be true or false, got {meta.get(key)!r}")
    if not isinstance(meta.get("cartography", False), bool):  # absent before the cartography group: false
        raise bad(f"has damaged metadata: cartography must be true or false, got {meta.get('cartography')!r}")
    if meta["eps_scalar"] and len(eps) != 1:
        raise bad(f"has damaged metadata: eps_scalar is true but eps has {len(eps)} values")
    _state_references.check_meta_names(meta, bad)  # the optional section of named references
    if version >= 3:
        want = layout.saved_columns(layout.groups_of_meta(meta))
        if meta.get("columns") != want:
            raise bad(f"lists the columns {meta.get('columns')!r}; this gdc_ext's layout for extras = {meta['extras']}, "
                      f"cartography = {meta.get('cartography', False)} is {want} (a file of another gdc_ext, or "
                      f"damaged metadata)")
    return meta


def _positive_finite(e) -> bool:
    if isinstance(e, bool) or not isinstance(e, (int, float)):
        return False
    try:
        return bool(np.isfinite(float(e)) and e > 0)
    except OverflowError:  # a huge JSON integer
        return False


def _expected_layout(meta: dict) -> dict:
    """{name: (dtype, shape)} of a state with this (checked) metadata, without building it: the
    layout of its format version (versions 1 and 2: gdc_ext._state_legacy)."""
    if meta["version"] in LEGACY_VERSIONS:
        return {**legacy_shapes(meta), **_state_references.layout(meta)}
    N, K = meta["num_samples"], len(meta["eps"])
    return {**layout.shapes(N, K, layout.groups_of_meta(meta)),
            "epoch": (torch.int64, (1,)),
            "eps": (torch.float64, (K,)),
            **_state_references.layout(meta)}


def _check_table(table: dict, layout: dict, data_size: int, bad) -> list:
    """Checks the header's tensor table against the layout the metadata implies and the file's
    size (before anything is allocated); returns the names in file order."""
    if set(table) != set(layout):
        raise bad(f"is not a CartoState file or is damaged: it holds tensors {sorted(map(str, table))}, "
                  f"expected {sorted(layout)}")
    spans = []
    for name, (dtype, shape) in layout.items():
        entry = table[name]
        want = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape)}
        if not isinstance(entry, dict) or {k: entry.get(k) for k in want} != want:
            got = {k: entry.get(k) for k in want} if isinstance(entry, dict) else entry
            raise bad(f"does not match its metadata: tensor {name!r} is {got} in the header, the metadata "
                      f"(num_samples, eps, extras, cartography) implies {want}")
        off = entry.get("data_offsets")
        if (not isinstance(off, list) or len(off) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in off)):
            raise bad(f"is damaged: tensor {name!r} has data_offsets {off!r}")
        size = int(np.prod(shape, dtype=object)) * torch.empty((), dtype=dtype).element_size()
        if off[1] - off[0] != size:
            raise bad(f"is damaged: tensor {name!r} spans {off[1] - off[0]} bytes, its shape needs {size}")
        spans.append((off[0], off[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise bad(f"is damaged: tensor {name!r} starts at byte {begin} of the data, expected {pos}")
        pos = end
    if pos != data_size:
        raise bad(f"has {data_size} bytes of tensor data but its header (num_samples = {layout['acc'][1][0]}, "
                  f"K = {layout['eps'][1][0]}) needs {pos}: truncated, damaged or crafted")
    return [name for _, _, name in spans]
