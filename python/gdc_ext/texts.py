"""The text of a few samples, read from the training data without loading it whole.

``gdc report STATE --dataset PATH`` and the HTML report show, beside each flagged sample's
scores, its text. The data is one of

- a ``datasets`` dataset saved with ``Dataset.save_to_disk`` (a folder with ``state.json``):
  opened memory-mapped (``datasets.load_from_disk``); only the rows shown are read;
- a Parquet file (``.parquet`` / ``.pq``): only the row groups holding the rows shown are read,
  and only the text (and id) column;
- a JSON Lines file (``.jsonl`` / ``.ndjson`` / ``.json`` with one object per line; blank lines
  are not rows): read line by line, only the rows shown are parsed (every row when an id field
  is named);
- a text file (``.txt`` / ``.text``): one sample per line (an empty line is an empty sample; the
  final newline does not start one), read line by line.

The sample id of a row is its index (0-based, in file order) unless ``id_field`` names a column
holding the ids (as ``gdc_ext.integrations.datasets.add_sample_ids`` writes them). Without an id
field, the number of rows must equal the number of samples of the state: a dataset of another
length is not the one the run trained on, and pairing its rows with the scores would be wrong.
datasets and pyarrow are imported on use only.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["FORMATS", "MAX_TEXT_CHARS", "dataset_format", "read_texts", "snippet", "clip"]

FORMATS = ("datasets", "parquet", "jsonl", "text")
# The characters of a sample's text kept for the HTML report and JSON output (the rest is cut, "...").
MAX_TEXT_CHARS = 2000
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
             ".txt": "text", ".text": "text"}


def dataset_format(path: str) -> str:
    """Which of :data:`FORMATS` ``path`` is (ValueError naming the path and the accepted forms)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            raise ValueError(f"{path!r} is a DatasetDict saved with save_to_disk: give the folder of the split the "
                             f"run trained on (e.g. {os.path.join(path, 'train')!r})")
        if os.path.isfile(os.path.join(path, "state.json")):
            return "datasets"
        raise ValueError(f"{path!r} is a folder but not a dataset saved with Dataset.save_to_disk (no state.json)")
    if not os.path.exists(path):
        raise ValueError(f"no file or folder at {path!r}")
    kind = _SUFFIXES.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ValueError(f"cannot tell the format of {path!r} from its name: expected a folder written by "
                         f"Dataset.save_to_disk, .parquet, .jsonl (or .ndjson, .json with one object per line), or "
                         f".txt (one sample per line)")
    return kind


def _check_ids(ids) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"ids must be a 1-D sequence of ints, got {a.dtype} with shape {a.shape}")
    return a.astype(np.int64)


def read_texts(path: str, ids: Sequence[int], *, text_field: str = "text", id_field: Optional[str] = None,
               num_samples: Optional[int] = None) -> List[Optional[str]]:
    """The text of each sample in ``ids`` (in that order), read from ``path`` (see the module doc).

    text_field: the column holding the text (ignored for a text file); a value that is not a
        string (token ids, say) is shown as ``str(value)``.
    id_field: the column holding each row's sample id (None: the id is the row index).
    num_samples: the state's N; without ``id_field`` the data must have exactly N rows
        (ValueError otherwise), and every id must be in [0, N).
    Returns a list with, per id, the text, or None when no row carries that id (``id_field``).
    Raises ValueError for an unknown format, a missing field, a row count that is not N, two rows
    with the same id, or an unreadable file.
    """
    path = os.fspath(path)
    kind = dataset_format(path)
    want = _check_ids(ids)
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a column name, got {text_field!r}")
    if id_field is not None and (not isinstance(id_field, str) or not id_field):
        raise ValueError(f"id_field must be a column name or None, got {id_field!r}")
    if kind == "text" and id_field is not None:
        raise ValueError(f"{path!r} is a text file (one sample per line): it has no fields, so id_field "
                         f"{id_field!r} cannot apply (the sample id is the line index)")
    if id_field is None and want.size and (want.min() < 0 or (num_samples is not None and want.max() >= num_samples)):
        raise ValueError(f"ids must be in [0, {num_samples}), got {int(want.min())}..{int(want.max())}")
    reader = {"datasets": _from_datasets, "parquet": _from_parquet, "jsonl": _from_jsonl, "text": _from_text}[kind]
    try:
        found, rows = reader(path, want, text_field, id_field)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path!r}: {e}") from None
    if id_field is None and num_samples is not None and rows != num_samples:
        raise ValueError(f"{path!r} has {rows} rows but the state has {num_samples} samples: the sample id is the row "
                         f"index, so this is not the data the run trained on (or name the column holding the ids "
                         f"with id_field / --id-field)")
    return [found.get(int(i)) for i in want]


def _missing_field(path: str, field: str, names, what: str = "text_field") -> ValueError:
    return ValueError(f"{path!r} has no column {field!r} ({what}); its columns: {', '.join(map(str, names))}")


def _as_text(v) -> str:
    return v if isinstance(v, str) else str(v)


def _duplicate(path: str, id_field: str, i) -> ValueError:
    return ValueError(f"{path!r}: two rows carry sample id {int(i)} in {id_field!r}: the ids must be unique")


def _from_datasets(path, want, text_field, id_field):
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    ds = datasets.load_from_disk(path)  # memory-mapped Arrow: nothing is read until asked for
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{path!r} holds a {type(ds).__name__}, not a Dataset: give the folder of one split")
    for f, what in ((text_field, "text_field"), (id_field, "id_field")):
        if f is not None and f not in ds.column_names:
            raise _missing_field(path, f, ds.column_names, what)
    arrow = ds.with_format("arrow")
    if id_field is None:
        rows = np.unique(want[(want >= 0) & (want < ds.num_rows)])
        positions, keys = rows, rows
    else:
        col = arrow[id_field]  # one column, memory-mapped
        _check_id_type(path, id_field, col)
        hit = pc.indices_nonzero(pc.is_in(col, value_set=pa.array(np.unique(want)))).to_numpy()
        positions = hit.astype(np.int64)
        keys = pc.take(col, pa.array(positions)).to_numpy(zero_copy_only=False).astype(np.int64) if len(positions) \
            else np.zeros(0, np.int64)
        _no_duplicates(path, id_field, keys)
    found: Dict[int, str] = {}
    if len(positions):
        texts = arrow.select_columns([text_field])[positions.tolist()].column(text_field).to_pylist()
        found = {int(k): _as_text(t) for k, t in zip(keys, texts)}
    return found, ds.num_rows


def _check_id_type(path, id_field, col) -> None:
    import pyarrow as pa

    if not pa.types.is_integer(col.type):
        raise ValueError(f"{path!r}: column {id_field!r} (id_field) holds {col.type}, not integer sample ids")


def _no_duplicates(path, id_field, keys) -> None:
    u, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise _duplicate(path, id_field, u[counts > 1][0])


def _from_parquet(path, want, text_field, id_field):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"cannot read {path!r} as Parquet: {e}") from None
    names = pf.schema_arrow.names
    for f, what in ((text_field, "text_field"), (id_field, "id_field")):
        if f is not None and f not in names:
            raise _missing_field(path, f, names, what)
    sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    if id_field is None:
        positions = np.unique(want[(want >= 0) & (want < total)])
        keys = positions
    else:  # the id column only, one row group at a time
        wanted = pa.array(np.unique(want))
        pos, ks = [], []
        for g in range(pf.num_row_groups):
            col = pf.read_row_group(g, columns=[id_field]).column(id_field)
            _check_id_type(path, id_field, col)
            hit = pc.indices_nonzero(pc.is_in(col, value_set=wanted)).to_numpy().astype(np.int64)
            if len(hit):
                pos.append(hit + starts[g])
                ks.append(pc.take(col, pa.array(hit)).to_numpy(zero_copy_only=False).astype(np.int64))
        positions = np.concatenate(pos) if pos else np.zeros(0, np.int64)
        keys = np.concatenate(ks) if ks else np.zeros(0, np.int64)
        _no_duplicates(path, id_field, keys)
    found: Dict[int, str] = {}
    groups = np.searchsorted(starts, positions, side="right") - 1
    for g in np.unique(groups):  # only the row groups holding a wanted row, only the text column
        sel = groups == g
        col = pf.read_row_group(int(g), columns=[text_field]).column(text_field)
        texts = col.take(pa.array(positions[sel] - starts[g])).to_pylist()
        found.update({int(k): _as_text(t) for k, t in zip(keys[sel], texts)})
    return found, total


def _lines(path):
    """(row index, line) of a text file, the line without its end of line characters."""
    with open(path, encoding="utf-8", newline="") as fh:
        for i, line in enumerate(fh):
            yield i, line.rstrip("\r\n") if line.endswith("\n") else line.rstrip("\r")


def _from_text(path, want, text_field, id_field):
    wanted = set(want.tolist())
    found, rows = {}, 0
    for i, line in _lines(path):
        rows = i + 1
        if i in wanted:
            found[i] = line
    return found, rows


def _from_jsonl(path, want, text_field, id_field):
    wanted = set(want.tolist())
    found, rows = {}, 0
    for n, line in _lines(path):
        if not line.strip():
            continue  # blank lines are not rows
        row = rows
        rows += 1
        if id_field is None and row not in wanted:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r}, line {n + 1}: not JSON ({e.msg}); a .jsonl file holds one JSON object per "
                             f"line") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path!r}, line {n + 1}: a JSON {type(obj).__name__}, not an object")
        if id_field is None:
            key = row
        else:
            if id_field not in obj:
                raise ValueError(f"{path!r}, line {n + 1}: no field {id_field!r} (id_field)")
            key = obj[id_field]
            if isinstance(key, bool) or not isinstance(key, int):
                raise ValueError(f"{path!r}, line {n + 1}: {id_field!r} is {key!r}, not an int sample id")
            if key not in wanted:
                continue
            if key in found:
                raise _duplicate(path, id_field, key)
        if text_field not in obj:
            raise ValueError(f"{path!r}, line {n + 1}: no field {text_field!r} (text_field); its fields: "
                             f"{', '.join(map(str, obj))}")
        found[key] = _as_text(obj[text_field])
    return found, rows


def _printable(text: str) -> str:
    # control characters (an escape sequence in a document, say) must not reach the terminal
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


def snippet(text: Optional[str], width: int = 80) -> str:
    """``text`` on one line (whitespace runs as one space, control characters escaped), cut to
    ``width`` characters with "..." at the end when longer; "" for None."""
    if text is None:
        return ""
    one = _printable(" ".join(text.split()))
    width = max(int(width), 4)
    return one if len(one) <= width else one[:width - 3] + "..."


def clip(text: Optional[str], limit: int = MAX_TEXT_CHARS) -> Optional[str]:
    """``text`` cut to ``limit`` characters ("..." appended when cut); None stays None."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + "..."
