"""Hugging Face ``datasets`` integration: sample ids on a Dataset, and the Dataset without (or with
only) the flagged samples, for the next run.

    from datasets import load_from_disk
    from gdc_ext.integrations.datasets import add_sample_ids, drop_ids, flagged_ids

    ds = add_sample_ids(load_from_disk("corpus"))           # "sample_ids" = row index 0..N-1
    ...train with CartoTrainer(train_dataset=ds, state=gdc_ext.CartoState(len(ds), ...)) ...
    flagged = flagged_ids(state.scores(), by="last", fraction=0.05)     # or quadrant=2
    drop_ids(ds, flagged).save_to_disk("corpus-clean")      # keeps the run's "sample_ids" column
    nxt = add_sample_ids(load_from_disk("corpus-clean"), keep_old_as="run1_sample_ids")  # ids 0..N'-1

Everything is vectorised over the id column (NumPy / Arrow): no Python loop over rows;
:func:`keep_ids` / :func:`drop_ids` return what ``ds.select(positions)`` returns, a view (an
indices mapping built with Arrow) that ``save_to_disk`` writes out.

``datasets`` is imported on use, never by ``import gdc_ext``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from gdc_ext.cartography import flagged_ids

__all__ = ["SAMPLE_IDS", "add_sample_ids", "keep_ids", "drop_ids", "flagged_ids", "sample_ids"]

SAMPLE_IDS = "sample_ids"  # the column CartoCollator / CartoTrainer read (gdc_ext.integrations.hf.SAMPLE_IDS)


def _dataset(ds, what: str):
    import datasets

    if isinstance(ds, datasets.Dataset):
        return ds
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{what}: ds is a DatasetDict; give one split (ds['train']): each split has its own ids")
    raise ValueError(f"{what}: ds must be a datasets.Dataset, got {type(ds).__name__}")


def _column_name(column, what: str) -> str:
    if not isinstance(column, str) or not column:
        raise ValueError(f"{what}: column must be a column name (str), got {column!r}")
    return column


def add_sample_ids(ds, column: str = SAMPLE_IDS, *, replace: bool = False, keep_old_as: Optional[str] = None):
    """``ds`` with an int64 column ``column`` holding each row's index (0..len(ds)-1): the sample ids
    a CartoState of ``len(ds)`` samples records under (CartoCollator passes the column through).

    When ``ds`` already has ``column`` (a filtered dataset still carries the previous run's ids,
    which have gaps and go past the new length) it raises ValueError unless ``replace=True`` (the
    old ids are dropped) or ``keep_old_as="NAME"`` (the old ids are kept under that name, so that
    the new run's ids map back to the previous run's)."""
    ds = _dataset(ds, "add_sample_ids")
    column = _column_name(column, "add_sample_ids")
    if keep_old_as is not None:
        keep_old_as = _column_name(keep_old_as, "add_sample_ids")
        if keep_old_as in ds.column_names:
            raise ValueError(f"add_sample_ids: keep_old_as={keep_old_as!r} is already a column of ds")
    if column in ds.column_names:
        if keep_old_as is not None:
            ds = ds.rename_column(column, keep_old_as)
        elif replace:
            ds = ds.remove_columns([column])
        else:
            raise ValueError(f"add_sample_ids: ds already has a column {column!r} (ids of an earlier run?); pass "
                             f"replace=True to renumber it, or keep_old_as='NAME' to keep the old ids in another column")
    elif keep_old_as is not None:
        raise ValueError(f"add_sample_ids: keep_old_as={keep_old_as!r} but ds has no column {column!r} to keep")
    return ds.add_column(column, np.arange(len(ds), dtype=np.int64))


def sample_ids(ds, column: str = SAMPLE_IDS) -> np.ndarray:
    """The ``column`` of ``ds`` as an int64 NumPy array [len(ds)] (one Arrow column read, no loop)."""
    import pyarrow as pa

    ds = _dataset(ds, "sample_ids")
    column = _column_name(column, "sample_ids")
    if column not in ds.column_names:
        raise ValueError(f"ds has no column {column!r} (its columns: {', '.join(ds.column_names)}); add the ids "
                         f"with add_sample_ids(ds) before training, or name the column holding them")
    col = ds.with_format("arrow")[column]
    if not pa.types.is_integer(col.type):
        raise ValueError(f"ds column {column!r} holds {col.type}, not integer sample ids")
    if col.null_count:
        raise ValueError(f"ds column {column!r} has {col.null_count} missing (null) sample ids")
    return col.to_numpy().astype(np.int64, copy=False)


def _ids(ids, what: str) -> np.ndarray:
    try:
        import torch

        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
    except ImportError:  # pragma: no cover (torch is a dependency)
        pass
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"{what}: ids must be a 1-D sequence of int sample ids, got {a.dtype} with shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _membership(have: np.ndarray, want: np.ndarray):
    """(have in want [len(have)] bool, want in have [len(want)] bool): by two boolean tables
    indexed by id when the ids are small non-negative ints (sample ids are: O(N + k)), else by
    sorting (np.isin)."""
    if have.size and want.size:
        lo = min(int(have.min()), int(want.min()))
        hi = max(int(have.max()), int(want.max()))
        if lo >= 0 and hi <= 4 * (have.size + want.size) + 1024:
            in_want = np.zeros(hi + 1, dtype=bool)
            in_want[want] = True
            in_have = np.zeros(hi + 1, dtype=bool)
            in_have[have] = True
            return in_want[have], in_have[want]
    return np.isin(have, want), np.isin(want, have)


def _take(ds, positions: np.ndarray):
    """``ds.select(positions)`` without its Python-level pass over the positions (datasets turns an
    array into a list of Python ints and checks it element by element: a minute and gigabytes for
    1e8 rows): the new indices mapping is built with Arrow on top of ds's (``Dataset``'s own
    constructor, as ``select`` does). Falls back to ``ds.select`` where ds has FAISS /
    Elasticsearch indexes attached or the datasets version stores its mapping elsewhere."""
    import datasets
    import pyarrow as pa
    from datasets.fingerprint import Hasher
    from datasets.table import InMemoryTable

    if ds.list_indexes() or not hasattr(ds, "_indices") or not hasattr(ds, "_fingerprint") or not len(ds):
        return ds.select(positions)
    idx = pa.array(positions.astype(np.uint64, copy=False), type=pa.uint64())
    if ds._indices is not None:  # compose with ds's own mapping (a shuffled or selected view)
        idx = ds._indices.column(0).take(idx)
    if isinstance(idx, pa.ChunkedArray):
        idx = idx.combine_chunks()
    fingerprint = Hasher.hash((ds._fingerprint, "gdc_ext.take", Hasher.hash(positions.tobytes())))
    out = datasets.Dataset(ds.data, info=ds.info.copy(), split=ds.split,
                           indices_table=InMemoryTable(pa.table({"indices": idx})), fingerprint=fingerprint)
    fmt = ds.format  # as select's transmit_format: the same format, the columns in the dataset's order
    columns = None if fmt["columns"] is None else [c for c in out.column_names if c in fmt["columns"]]
    out.set_format(type=fmt["type"], columns=columns, output_all_columns=fmt["output_all_columns"],
                   **fmt["format_kwargs"])
    return out


def _select(ds, ids, column: str, strict: bool, keep: bool, what: str):
    ds = _dataset(ds, what)
    want = _ids(ids, what)
    have = sample_ids(ds, column)
    hit, found = _membership(have, want)
    if strict and not found.all():
        missing = np.unique(want[~found])
        raise ValueError(f"{what}: {missing.size} of the {np.unique(want).size} ids are not in ds's {column!r} "
                         f"column (first: {int(missing[0])}): ids of another dataset, or already removed? Pass "
                         f"strict=False to ignore them")
    return _take(ds, np.flatnonzero(hit if keep else ~hit))


def keep_ids(ds, ids, column: str = SAMPLE_IDS, *, strict: bool = True):
    """The rows of ``ds`` whose ``column`` value is in ``ids`` (in ds's order), as ``ds.select``.
    With ``strict`` (default) an id found in no row raises ValueError."""
    return _select(ds, ids, column, strict, True, "keep_ids")


def drop_ids(ds, ids, column: str = SAMPLE_IDS, *, strict: bool = True):
    """The rows of ``ds`` whose ``column`` value is not in ``ids`` (in ds's order), as ``ds.select``:
    e.g. ``drop_ids(ds, flagged_ids(scores, fraction=0.05))``. With ``strict`` (default) an id found
    in no row raises ValueError."""
    return _select(ds, ids, column, strict, False, "drop_ids")
