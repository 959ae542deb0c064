"""Audit your own data: plant synthetic canaries, train as usual, see which score finds them and
how much leaks.

The reproduction measured the scores on its own corpora; how they do on yours is a question only
your data and your run can answer. This kit answers it the way the extraction literature does
(Carlini et al. 2019, "The Secret Sharer"):

1. :func:`plant` inserts synthetic canaries into your token dataset: each canary is a row that
   starts with a random *prefix* (the template) followed by a random *secret* of ``secret_len``
   tokens drawn from a small ``alphabet``, the rest of the row filled with your own tokens; each
   is inserted ``r`` times for ``r`` in ``reps`` (default 1, 2, 4, 8 copies). Every canary has a
   held-out *twin*: the same prefix with another random secret, never inserted (the control).
   Everything is drawn from your token space, seeded, and saved as JSON
   (:meth:`Canaries.save`), so you can plant, train anywhere, and report later.
2. Train on the returned data as you would on yours, recording with gdc_ext.
3. :func:`report` takes the canaries and the run's scores and gives, for every score of
   :data:`gdc_ext.SCORES` that can be computed, AUROC and recall at the top 1 / 5 / 10 % for
   "is an inserted canary row", overall and per repetition count; given the model, also the
   exposure and the greedy extraction of every secret, inserted and twin.

Definitions (docs/method.md, "Auditing with planted canaries"):

- Positives are the inserted canary rows (every copy); negatives are the rows of the original
  data. Per repetition count ``r``, the positives are the rows of the canaries inserted ``r``
  times and the negatives the same original rows.
- AUROC: the probability that a positive scores higher than a negative, ties counted half
  (the Mann-Whitney statistic, from average ranks). Unscored rows (NaN score) rank below every
  scored row, as :func:`gdc_ext.selection_order` selects them last.
- Recall at q: of the positives, the fraction among the top ``round(q * N)`` of all N training
  rows by the score (the budget :func:`gdc_ext.prune` removes at ``fraction=q``); rows tied
  with the last selected one are taken in expectation over a random order among them, so the
  number does not depend on ids.
- Exposure of a secret s after a prefix p (bits): ``log2 |R| - log2 rank(s)``, R the set of
  all ``|alphabet| ** secret_len`` secrets, ``rank(s) = 1 + #{r in R: log P(r | p) > log P(s | p)}
  + 1/2 #{r != s: log P(r | p) = log P(s | p)}`` under the model (equal: up to float64 rounding,
  relative 1e-9). Enumerated exactly when ``|R| <= max_exact`` (20000), at a cost of ``|R|``
  sequences through the model per secret; otherwise estimated from ``sample_size`` candidates drawn
  uniformly from R without s: ``rank ~ 1 + (|R| - 1) c / M`` with c the count above (ties half)
  among the M samples, floored at 1, so the estimate resolves exposures up to
  ``log2 |R| - log2(1 + (|R| - 1) / M)`` (about ``log2 M`` bits) and reports a secret that beats
  every sample at that cap (a lower bound; ``capped`` in the report). A secret the model knows no
  better than chance has an exposure of about 1 bit (1 / ln 2 = 1.44 on average over random
  ranks); the twins show that baseline on your model.
- Greedy extraction: decoding ``secret_len`` tokens greedily (argmax over the whole vocabulary)
  from the prefix reproduces the secret exactly.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["Canary", "Twin", "Canaries", "AuditReport", "plant", "report", "auroc", "recall_at", "exposure",
           "greedy_extract"]

FORMAT = "gdc_ext.audit.canaries"
FORMAT_VERSION = 1
DEFAULT_FRACTIONS = (0.01, 0.05, 0.10)


# ------------------------------------------------------------------------------------- records
@dataclass
class Canary:
    """One planted canary: the row ``prefix + secret + filler`` (``row``), inserted ``reps`` times
    at the sample ids ``ids`` of the returned data."""

    prefix: List[int]
    secret: List[int]
    reps: int
    ids: List[int]
    row: List[int]


@dataclass
class Twin:
    """The held-out control of canary ``canary``: its prefix with another random secret, never
    inserted. ``reps`` is its canary's repetition count (for grouping; the twin has 0 copies)."""

    prefix: List[int]
    secret: List[int]
    canary: int
    reps: int


@dataclass
class Canaries:
    """What :func:`plant` did. ``data`` is the dataset with the canary rows appended (the original
    rows keep their ids 0..num_original-1); everything else is saved by :meth:`save` as JSON (the
    data is not: keep it where you keep your data).

    Attributes:
        data: the new dataset (same kind as given), or None after :meth:`load`.
        num_original: N, the rows of the data given.
        num_rows: N + the inserted rows, the sample ids the run's scores must cover.
        inserted_ids: the sorted sample ids of all inserted rows (N..num_rows-1).
        canaries: per canary, prefix, secret, reps, ids and the full row.
        twins: ``twins[i]`` is the held-out twin of ``canaries[i]``.
        alphabet: the token ids the secrets are drawn from.
        secret_len, length, vocab_size, seed, reps: the settings used (length: the canary row's
            number of tokens).
    """

    data: Any
    num_original: int
    num_rows: int
    inserted_ids: List[int]
    canaries: List[Canary]
    twins: List[Twin]
    alphabet: List[int]
    secret_len: int
    length: int
    vocab_size: int
    seed: int
    reps: List[int]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict of everything but ``data``."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "num_original": self.num_original,
                "num_rows": self.num_rows, "inserted_ids": list(self.inserted_ids),
                "canaries": [asdict(c) for c in self.canaries], "twins": [asdict(t) for t in self.twins],
                "alphabet": list(self.alphabet), "secret_len": self.secret_len, "length": self.length,
                "vocab_size": self.vocab_size, "seed": self.seed, "reps": list(self.reps)}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes :meth:`to_dict` to ``path`` as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], data: Any = None) -> "Canaries":
        """The inverse of :meth:`to_dict` (checked: a ValueError names what is wrong)."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError(f"not a gdc_ext.audit canaries record (expected format {FORMAT!r})")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"canaries record version {d.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        try:
            canaries = [Canary(**c) for c in d["canaries"]]
            twins = [Twin(**t) for t in d["twins"]]
            out = cls(data=data, num_original=int(d["num_original"]), num_rows=int(d["num_rows"]),
                      inserted_ids=[int(i) for i in d["inserted_ids"]], canaries=canaries, twins=twins,
                      alphabet=[int(a) for a in d["alphabet"]], secret_len=int(d["secret_len"]),
                      length=int(d["length"]), vocab_size=int(d["vocab_size"]), seed=int(d["seed"]),
                      reps=[int(r) for r in d["reps"]])
        except (KeyError, TypeError) as e:
            raise ValueError(f"canaries record is incomplete or malformed: {e!r}") from None
        out._check()
        return out

    @classmethod
    def load(cls, path: Union[str, os.PathLike], data: Any = None) -> "Canaries":
        """Reads a record written by :meth:`save` (``data``: attach the dataset if you have it)."""
        with open(path) as f:
            return cls.from_dict(json.load(f), data=data)

    def _check(self) -> None:
        ids = sorted(i for c in self.canaries for i in c.ids)
        if ids != sorted(self.inserted_ids) or len(set(ids)) != len(ids):
            raise ValueError("canaries record: inserted_ids must be the union of the canaries' ids, each once")
        if ids and not (self.num_original <= ids[0] and ids[-1] < self.num_rows):
            raise ValueError("canaries record: inserted ids must lie in [num_original, num_rows)")
        if self.num_rows != self.num_original + len(ids):
            raise ValueError("canaries record: num_rows must be num_original + the number of inserted rows")
        if len(self.twins) != len(self.canaries):
            raise ValueError("canaries record: one twin per canary expected")
        for c in self.canaries:
            if len(c.ids) != c.reps or len(c.secret) != self.secret_len:
                raise ValueError("canaries record: each canary needs reps ids and a secret of secret_len tokens")

    def __repr__(self) -> str:
        return (f"Canaries({len(self.canaries)} canaries x reps {self.reps} = {len(self.inserted_ids)} rows "
                f"appended to {self.num_original}; secrets of {self.secret_len} tokens over an alphabet of "
                f"{len(self.alphabet)})")


# -------------------------------------------------------------------------------------- plant
def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _token_list(x, name: str, vocab_size: int) -> List[int]:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1 or a.size == 0 or a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty 1-D sequence of integer token ids, got "
                         f"{type(x).__name__} of shape {a.shape} and dtype {a.dtype}")
    if a.min() < 0 or a.max() >= vocab_size:
        raise ValueError(f"{name}: token ids must lie in [0, vocab_size = {vocab_size}), got {a.min()}..{a.max()}")
    return [int(t) for t in a]


def _is_hf_dataset(data) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "add_item") and not isinstance(data, (list, tuple))


def _rows_of(data, scan_rows: int, rng: np.random.Generator, vocab_size: int) -> Tuple[str, int, List[np.ndarray]]:
    """(kind, N, scanned rows as 1-D int64 arrays). kind: 'tensor', 'array', 'list' or 'dataset'.
    Tensors, arrays and Datasets are scanned at up to ``scan_rows`` seeded random rows (a tensor or
    array is range-checked whole); lists are read whole."""
    if isinstance(data, torch.Tensor) or isinstance(data, np.ndarray):
        kind = "tensor" if isinstance(data, torch.Tensor) else "array"
        a = data.detach().cpu().numpy() if kind == "tensor" else data
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError(f"data: a {kind} must be 2-D [N, L] token ids with N, L >= 1, got shape {tuple(a.shape)}")
        if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"data must hold integer token ids, got dtype {a.dtype}")
        if a.min() < 0 or a.max() >= vocab_size:
            raise ValueError(f"data: token ids must lie in [0, vocab_size = {vocab_size}), got {a.min()}..{a.max()}")
        idx = np.sort(rng.choice(a.shape[0], size=min(a.shape[0], scan_rows), replace=False))
        return kind, a.shape[0], [a[i].astype(np.int64) for i in idx]
    if _is_hf_dataset(data):
        if "input_ids" not in data.column_names:
            raise ValueError(f"data: a Dataset needs an 'input_ids' column, got columns {list(data.column_names)}")
        n = len(data)
        if n < 1:
            raise ValueError("data is empty")
        idx = np.sort(rng.choice(n, size=min(n, scan_rows), replace=False))
        rows = [np.asarray(data[int(i)]["input_ids"]) for i in idx]
        kind = "dataset"
    elif isinstance(data, (list, tuple)):
        if len(data) < 1:
            raise ValueError("data is empty")
        rows = [r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r) for r in data]
        n, kind = len(data), "list"
    else:
        raise ValueError(f"data must be a 2-D tensor/array [N, L] of token ids, a list of 1-D token sequences, or a "
                         f"datasets.Dataset with an 'input_ids' column, got {type(data).__name__}")
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0 or r.dtype == bool or not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"data: every row must be a non-empty 1-D sequence of integer token ids; row {i} has "
                             f"shape {r.shape} and dtype {r.dtype}")
    return kind, n, [r.astype(np.int64) for r in rows]


def _draw_distinct(rng: np.random.Generator, alphabet: np.ndarray, k: int, secret_len: int) -> List[List[int]]:
    seen, out = set(), []
    while len(out) < k:
        s = tuple(int(t) for t in rng.choice(alphabet, size=secret_len))
        if s not in seen:
            seen.add(s)
            out.append(list(s))
    return out


def plant(data, *, vocab_size: int, num_canaries_per_rep: int = 4, reps: Sequence[int] = (1, 2, 4, 8),
          secret_len: int = 6, alphabet: Optional[Sequence[int]] = None, alphabet_size: int = 10,
          template: Optional[Sequence] = None, template_len: int = 8, length: Optional[int] = None,
          filler: Union[str, int] = "data", exclude: Sequence[int] = (), columns: Optional[Mapping[str, Any]] = None,
          scan_rows: int = 2000, seed: int = 0) -> Canaries:
    """Inserts synthetic canaries into a token dataset; returns them with the new data.

    Each canary is one row of ``length`` tokens: ``prefix + secret + filler``. There are
    ``num_canaries_per_rep`` canaries for each ``r`` in ``reps``, each appended ``r`` times
    (identical copies), so ``num_canaries_per_rep * sum(reps)`` rows are added after the original
    rows (which keep their ids; the copies are appended in a seeded random order: shuffle while
    training, as loaders normally do). Each canary has a twin, its prefix with another secret,
    never inserted. All secrets (canaries and twins) are distinct. Seeded: the same arguments
    give the same canaries.

    Args:
        data: the token dataset: a 2-D tensor or NumPy array [N, L] of token ids (the result is a
            [N + inserted, L] tensor/array of the same dtype and device), a list of 1-D token
            sequences (tensors, arrays or lists; the result is a new list with rows of the first
            row's type), or a Hugging Face ``datasets.Dataset`` with an ``input_ids`` column (rows
            added with ``Dataset.add_item``; see ``columns``). The sample id of a row is its index.
        vocab_size: the tokenizer's vocabulary size V; every token must lie in [0, V).
        num_canaries_per_rep: canaries per repetition count.
        reps: the repetition counts (distinct ints >= 1).
        secret_len: tokens per secret.
        alphabet: the token ids secrets are drawn from (uniformly, independently per position);
            default: ``alphabet_size`` distinct ids drawn (seeded) from the data's tokens.
        alphabet_size: the default alphabet's size (10: 10 ** 6 possible secrets by default).
        template: None (each canary gets its own prefix of ``template_len`` tokens drawn uniformly
            from the data's tokens, so greedy decoding can tell the canaries apart), one 1-D
            sequence of token ids shared by every canary (then greedy decoding from it can
            reproduce at most one secret), or a list with one prefix per canary (ordered by
            ``reps``, ``num_canaries_per_rep`` each).
        template_len: the length of drawn prefixes.
        length: the canary row's length; default: L for a 2-D [N, L] input, else the median row
            length of the (scanned) rows. Must hold prefix + secret.
        filler: "data" (the rest of the row after the secret is taken from the data's own rows,
            seeded) or an int pad token id (the rest is that id; a Dataset's ``attention_mask``
            is 0 and its ``labels`` -100 there).
        exclude: token ids never drawn for prefixes and the default alphabet: special tokens (BOS,
            EOS, the pad id of padded data; with padded data pass ``filler=`` the pad id too).
        columns: a Dataset's canary rows get ``input_ids``; ``attention_mask`` (1 on tokens),
            ``labels`` (the tokens), ``token_type_ids`` (0) and ``sample_ids`` (the row's index)
            when the Dataset has those columns; any other column needs a value here
            (``{name: value}``, the same for every canary row).
        scan_rows: the data's tokens above (and filler, and a Dataset's median length) come from
            this many seeded random rows of a tensor, array or Dataset (a list is read whole); a
            tensor or array is range-checked whole, a Dataset at those rows.
        seed: the seed of every draw.

    Returns:
        :class:`Canaries` (the new data, the inserted ids, the canaries and twins, the alphabet).
    """
    vocab_size = _int(vocab_size, "vocab_size", 2)
    num_canaries_per_rep = _int(num_canaries_per_rep, "num_canaries_per_rep", 1)
    secret_len = _int(secret_len, "secret_len", 1)
    template_len = _int(template_len, "template_len", 1)
    alphabet_size = _int(alphabet_size, "alphabet_size", 2)
    scan_rows = _int(scan_rows, "scan_rows", 1)
    seed = _int(seed, "seed", 0)
    if isinstance(reps, (int, np.integer)) or not reps or not all(
            isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 1 for r in reps) \
            or len(set(int(r) for r in reps)) != len(reps):
        raise ValueError(f"reps must be a non-empty sequence of distinct ints >= 1, got {reps!r}")
    reps = [int(r) for r in reps]
    if not (filler == "data" or (isinstance(filler, (int, np.integer)) and not isinstance(filler, bool)
                                 and 0 <= filler < vocab_size)):
        raise ValueError(f"filler must be 'data' or a pad token id in [0, vocab_size = {vocab_size}), got {filler!r}")
    excluded = set(_token_list(exclude, "exclude", vocab_size)) if len(exclude) else set()
    rng = np.random.default_rng(seed)
    kind, n, rows = _rows_of(data, scan_rows, rng, vocab_size)
    for i, r in enumerate(rows):
        if r.min() < 0 or r.max() >= vocab_size:
            raise ValueError(f"data: token ids must lie in [0, vocab_size = {vocab_size}); a row (scanned #{i}) holds "
                             f"{int(r.min())}..{int(r.max())}")
    pool = np.array(sorted(set(np.unique(np.concatenate(rows)).tolist()) - excluded), dtype=np.int64)
    num_canaries = num_canaries_per_rep * len(reps)

    if alphabet is None:
        if len(pool) < 2:
            raise ValueError("data: fewer than 2 distinct token ids (after exclude) to draw an alphabet from; pass alphabet=")
        alpha = np.sort(rng.choice(pool, size=min(alphabet_size, len(pool)), replace=False))
    else:
        alpha = np.array(sorted(set(_token_list(alphabet, "alphabet", vocab_size))), dtype=np.int64)
        if len(alpha) < 2:
            raise ValueError(f"alphabet must hold at least 2 distinct token ids, got {alphabet!r}")
    if len(alpha) ** secret_len < 2 * num_canaries:
        raise ValueError(f"alphabet ** secret_len = {len(alpha)} ** {secret_len} secrets cannot give {2 * num_canaries} "
                         f"distinct secrets (canaries and twins): lengthen secret_len or the alphabet")

    if template is None:
        if len(pool) < 1:
            raise ValueError("data: no token id left (after exclude) to draw prefixes from; pass template=")
        prefixes = [[int(t) for t in rng.choice(pool, size=template_len)] for _ in range(num_canaries)]
    else:
        if len(template) == 0:
            raise ValueError("template must be None, a non-empty 1-D sequence of token ids, or one prefix per canary")
        t0 = template[0]
        if isinstance(t0, (int, np.integer)) or (isinstance(template, (torch.Tensor, np.ndarray))
                                                  and np.ndim(template) == 1):
            shared = _token_list(template, "template", vocab_size)
            prefixes = [list(shared) for _ in range(num_canaries)]
        else:
            if len(template) != num_canaries:
                raise ValueError(f"template: a list of prefixes needs one per canary ({num_canaries} = "
                                 f"num_canaries_per_rep * len(reps)), got {len(template)}")
            prefixes = [_token_list(t, f"template[{i}]", vocab_size) for i, t in enumerate(template)]

    if length is None:
        length = rows[0].size if kind in ("tensor", "array") else int(np.median([r.size for r in rows]))
    length = _int(length, "length", 1)
    if kind in ("tensor", "array") and length != rows[0].size:
        raise ValueError(f"length must be the rows' length L = {rows[0].size} for a 2-D [N, L] input, got {length}")
    longest = max(len(p) for p in prefixes) + secret_len
    if longest > length:
        raise ValueError(f"a canary (prefix {max(len(p) for p in prefixes)} + secret {secret_len} tokens) does not fit "
                         f"in a row of length {length}: shorten template_len / template or secret_len, or pass length=")

    secrets = _draw_distinct(rng, alpha, 2 * num_canaries, secret_len)
    canary_reps = [r for r in reps for _ in range(num_canaries_per_rep)]
    canary_rows, pad_from = [], []
    for k in range(num_canaries):
        head = prefixes[k] + secrets[k]
        rest = length - len(head)
        if filler == "data":
            fill: List[int] = []
            while len(fill) < rest:
                fill.extend(rows[int(rng.integers(len(rows)))].tolist())
            canary_rows.append(head + fill[:rest])
        else:
            canary_rows.append(head + [int(filler)] * rest)
        pad_from.append(len(head) if filler != "data" else length)

    # the copies, in a seeded random order after the original rows
    copies = [k for k in range(num_canaries) for _ in range(canary_reps[k])]
    order = rng.permutation(len(copies))
    ids_of: List[List[int]] = [[] for _ in range(num_canaries)]
    new_rows = []
    for pos, j in enumerate(order):
        k = copies[int(j)]
        ids_of[k].append(n + pos)
        new_rows.append(k)

    new_data = _append(data, kind, [canary_rows[k] for k in new_rows], [pad_from[k] for k in new_rows], n,
                       columns, filler)
    canaries = [Canary(prefix=prefixes[k], secret=secrets[k], reps=canary_reps[k], ids=ids_of[k], row=canary_rows[k])
                for k in range(num_canaries)]
    twins = [Twin(prefix=list(prefixes[k]), secret=secrets[num_canaries + k], canary=k, reps=canary_reps[k])
             for k in range(num_canaries)]
    out = Canaries(data=new_data, num_original=n, num_rows=n + len(copies), inserted_ids=list(range(n, n + len(copies))),
                   canaries=canaries, twins=twins, alphabet=[int(a) for a in alpha], secret_len=secret_len,
                   length=length, vocab_size=vocab_size, seed=seed, reps=reps)
    out._check()
    return out


_KNOWN_COLUMNS = ("input_ids", "attention_mask", "labels", "token_type_ids", "sample_ids")


def _append(data, kind: str, new_rows: List[List[int]], pad_from: List[int], n: int,
            columns: Optional[Mapping[str, Any]], filler):
    """The data with ``new_rows`` appended (rows n, n+1, ...), in the data's own kind."""
    if kind == "tensor":
        add = torch.tensor(new_rows, dtype=data.dtype, device=data.device)
        return torch.cat([data, add])
    if kind == "array":
        return np.concatenate([data, np.asarray(new_rows, dtype=data.dtype)])
    if kind == "list":
        first = data[0]
        if isinstance(first, torch.Tensor):
            conv = lambda r: torch.tensor(r, dtype=first.dtype, device=first.device)  # noqa: E731
        elif isinstance(first, np.ndarray):
            conv = lambda r: np.asarray(r, dtype=first.dtype)  # noqa: E731
        elif isinstance(first, tuple):
            conv = tuple
        else:
            conv = list
        return list(data) + [conv(r) for r in new_rows]
    # a Hugging Face Dataset (or anything with column_names and add_item -> a new dataset)
    columns = dict(columns or {})
    unknown = [c for c in data.column_names if c not in _KNOWN_COLUMNS and c not in columns]
    if unknown:
        raise ValueError(f"data: the Dataset's columns {unknown} need a value for the canary rows: pass "
                         f"columns={{{', '.join(repr(c) + ': ...' for c in unknown)}}}")
    per_token_ids = False
    if "sample_ids" in data.column_names and "sample_ids" not in columns:
        per_token_ids = isinstance(data[0]["sample_ids"], (list, tuple, np.ndarray, torch.Tensor))
    out = data
    for j, (row, cut) in enumerate(zip(new_rows, pad_from)):
        item: Dict[str, Any] = {}
        for c in data.column_names:
            if c in columns:
                item[c] = columns[c]
            elif c == "input_ids":
                item[c] = list(row)
            elif c == "attention_mask":
                item[c] = [1] * cut + [0] * (len(row) - cut)
            elif c == "labels":
                item[c] = list(row[:cut]) + [-100] * (len(row) - cut)
            elif c == "token_type_ids":
                item[c] = [0] * len(row)
            elif c == "sample_ids":
                item[c] = [n + j] * len(row) if per_token_ids else n + j
        out = out.add_item(item)
    return out


# ---------------------------------------------------------------------------------- detection
def _scores_1d(x, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (NaN ranks lowest, tied)."""
    v = np.where(np.isnan(x), -np.inf, x)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # a group of equal values spans ranks ends - counts + 1 .. ends
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def auroc(positive_scores, negative_scores) -> float:
    """P(a positive scores higher than a negative), ties counted half; NaN scores rank below
    every number (unscored samples are selected last). NaN when either side is empty."""
    p = _scores_1d(positive_scores, "positive_scores")
    q = _scores_1d(negative_scores, "negative_scores")
    if len(p) == 0 or len(q) == 0:
        return float("nan")
    r = _average_ranks(np.concatenate([p, q]))
    u = r[:len(p)].sum() - len(p) * (len(p) + 1) / 2.0
    return float(u / (len(p) * len(q)))


def recall_at(scores, positives, fraction: float) -> float:
    """Of the ``positives`` (ids), the fraction among the top ``round(fraction * N)`` of all N
    ``scores`` (highest first; NaN lowest). The rows tied with the last selected score are
    selected in expectation over a random order among them (each positive there counts
    slots / tied rows), so the result does not depend on ids. NaN for no positives."""
    s = _scores_1d(scores, "scores")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    pos = np.zeros(len(s), dtype=bool)
    pos_ids = np.asarray(positives, dtype=np.int64).reshape(-1)
    if pos_ids.size and (pos_ids.min() < 0 or pos_ids.max() >= len(s)):
        raise ValueError(f"positives must be ids in [0, {len(s)})")
    pos[pos_ids] = True
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan")
    k = int(round(float(fraction) * len(s)))
    if k == 0:
        return 0.0
    v = np.where(np.isnan(s), -np.inf, s)
    t = np.sort(v)[::-1][k - 1]  # the last selected score
    above = v > t
    tied = v == t
    slots = k - int(above.sum())
    hit = pos[above].sum() + pos[tied].sum() * slots / int(tied.sum())
    return float(hit / n_pos)


# ----------------------------------------------------------------------------------- exposure
def _logits_fn(model, forward, device):
    if (model is None) == (forward is None):
        raise ValueError("give model= (a callable tokens [n, T] -> logits [n, T, V]) or forward= "
                         "(the same for another calling convention), exactly one")
    fn = model if forward is None else forward
    if not callable(fn):
        raise ValueError(f"{'model' if forward is None else 'forward'} must be callable, got {type(fn).__name__}")
    if device is None:
        p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")

    def call(tokens: torch.Tensor) -> torch.Tensor:
        out = fn(tokens.to(device))
        logits = out["logits"] if isinstance(out, Mapping) else (out.logits if hasattr(out, "logits") else out)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
            raise ValueError(f"the model must return logits [n, T, V] for tokens [n, T] = {list(tokens.shape)}, got "
                             f"{type(logits).__name__}{'' if not isinstance(logits, torch.Tensor) else list(logits.shape)}")
        return logits
    return call


@torch.no_grad()
def _secret_logprobs(call, prefix: Sequence[int], cands: np.ndarray, batch_size: int) -> np.ndarray:
    """log P(cand | prefix) [M] float64 for candidate secrets cands [M, S]."""
    P, M = len(prefix), cands.shape[0]
    out = np.empty(M, dtype=np.float64)
    pre = torch.tensor(prefix, dtype=torch.long)
    for s in range(0, M, batch_size):
        c = torch.from_numpy(cands[s:s + batch_size]).long()
        x = torch.cat([pre.expand(c.shape[0], P), c[:, :-1]], dim=1)
        logits = call(x)[:, P - 1:, :].double()
        lp = torch.log_softmax(logits, dim=-1).gather(2, c.to(logits.device)[:, :, None])[:, :, 0].sum(1)
        out[s:s + batch_size] = lp.cpu().numpy()
    return out


def _all_secrets(alphabet: np.ndarray, S: int) -> np.ndarray:
    A = len(alphabet)
    idx = np.arange(A ** S)
    digits = np.stack([(idx // A ** (S - 1 - j)) % A for j in range(S)], axis=1)
    return alphabet[digits]


def _above_tied(lp: np.ndarray, mine: float) -> Tuple[float, float]:
    """(#above, #tied): candidates more / as likely as the secret. Equal means equal up to float64
    rounding (relative 1e-9): the same log-probabilities summed in another order are a tie."""
    tol = 1e-9 * max(1.0, abs(float(mine)))
    return float((lp > mine + tol).sum()), float((np.abs(lp - mine) <= tol).sum())


def exposure(call_or_model, prefix: Sequence[int], secret: Sequence[int], alphabet: Sequence[int], *,
             max_exact: int = 20_000, sample_size: int = 4096, batch_size: int = 1024,
             rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
    """Exposure (bits) of ``secret`` after ``prefix`` under a model (module docstring: exact when
    ``|alphabet| ** len(secret) <= max_exact``, else sampled from ``sample_size`` candidates).

    call_or_model: a callable tokens [n, T] (int64) -> logits [n, T, V] (or an output with
    ``logits``), run as it is, without grad (:func:`report` also puts a module in eval mode).
    rng: the sampled candidates' generator (default seeded 0). Returns {"exposure", "rank",
    "method", "space", "max_bits", "capped"}; ``rank`` is the exact rank or the sampled estimate.
    """
    call = call_or_model if getattr(call_or_model, "_gdc_checked", False) else _logits_fn(call_or_model, None, None)
    alpha = np.asarray(sorted(set(int(a) for a in alphabet)), dtype=np.int64)
    sec = np.asarray(secret, dtype=np.int64)
    S = len(sec)
    space = len(alpha) ** S  # a Python int: exact however large
    log2_space = math.log2(space)
    if not np.isin(sec, alpha).all():
        raise ValueError("secret: every token must be in the alphabet")
    if space <= max_exact:
        cands = _all_secrets(alpha, S)
        lp = _secret_logprobs(call, prefix, cands, batch_size)
        at = int(np.flatnonzero((cands == sec).all(1))[0])
        above, tied = _above_tied(lp, lp[at])
        rank = 1.0 + above + 0.5 * (tied - 1)  # tied counts the secret itself
        return {"exposure": log2_space - math.log2(rank), "rank": rank, "method": "exact", "space": len(cands),
                "max_bits": log2_space, "capped": False}
    rng = np.random.default_rng(0) if rng is None else rng
    cands = rng.choice(alpha, size=(sample_size, S))
    same = (cands == sec).all(1)
    while same.any():  # uniform over R without the secret: redraw the copies of it
        cands[same] = rng.choice(alpha, size=(int(same.sum()), S))
        same = (cands == sec).all(1)
    lp = _secret_logprobs(call, prefix, np.concatenate([sec[None], cands]), batch_size)
    above, tied = _above_tied(lp[1:], lp[0])
    c = above + 0.5 * tied
    rank = 1.0 + float(space - 1) * max(c, 1.0) / sample_size
    return {"exposure": log2_space - math.log2(rank), "rank": rank, "method": "sampled", "space": space,
            "max_bits": log2_space, "capped": c < 1.0}


@torch.no_grad()
def greedy_extract(call_or_model, prefixes: Sequence[Sequence[int]], length: int) -> List[List[int]]:
    """Greedy decoding (argmax over the whole vocabulary, first index on ties) of ``length``
    tokens after each prefix; prefixes of one length are decoded as a batch."""
    call = call_or_model if getattr(call_or_model, "_gdc_checked", False) else _logits_fn(call_or_model, None, None)
    out: List[Optional[List[int]]] = [None] * len(prefixes)
    by_len: Dict[int, List[int]] = {}
    for i, p in enumerate(prefixes):
        by_len.setdefault(len(p), []).append(i)
    for _, members in sorted(by_len.items()):
        x = torch.tensor([list(prefixes[i]) for i in members], dtype=torch.long)
        for _ in range(length):
            nxt = call(x)[:, -1, :].argmax(-1).cpu()
            x = torch.cat([x, nxt[:, None]], dim=1)
        for row, i in zip(x[:, -length:].tolist(), members):
            out[i] = row
    return out  # type: ignore[return-value]


# -------------------------------------------------------------------------------------- report
@dataclass
class AuditReport:
    """What :func:`report` measured. ``scores[name]`` = {"auroc", "recall" {"1%": ...},
    "by_reps" {r: {"auroc", "recall"}}}; ``skipped[name]`` says why a score was not computed;
    ``secrets``: per inserted canary and twin, its exposure and greedy extraction (empty without
    a model); ``exposure_method``: how exposure was computed."""

    num_rows: int
    num_original: int
    num_inserted: int
    reps: List[int]
    fractions: List[float]
    scores: Dict[str, Dict[str, Any]]
    skipped: Dict[str, str] = field(default_factory=dict)
    unscored: int = 0
    secrets: List[Dict[str, Any]] = field(default_factory=list)
    exposure_method: Optional[Dict[str, Any]] = None

    def exposure_by_reps(self) -> Dict[int, Dict[str, Dict[str, float]]]:
        """Per r: for "inserted" and "twins", n, mean / min / max exposure (bits) and the
        fraction greedily extracted."""
        out: Dict[int, Dict[str, Dict[str, float]]] = {}
        for r in self.reps:
            out[r] = {}
            for kind, label in (("inserted", "inserted"), ("twin", "twins")):
                rows = [s for s in self.secrets if s["reps"] == r and s["kind"] == kind]
                if not rows:
                    continue
                e = np.array([s["exposure"] for s in rows])
                out[r][label] = {"n": len(rows), "mean_exposure": float(e.mean()), "min_exposure": float(e.min()),
                                 "max_exposure": float(e.max()),
                                 "extracted": float(np.mean([s["extracted"] for s in rows]))}
        return out

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (repetition counts as string keys)."""
        scores = {name: {"auroc": v["auroc"], "recall": dict(v["recall"]),
                         "by_reps": {str(r): dict(b) for r, b in v["by_reps"].items()}} for name, v in self.scores.items()}
        return {"num_rows": self.num_rows, "num_original": self.num_original, "num_inserted": self.num_inserted,
                "reps": list(self.reps), "fractions": list(self.fractions), "unscored": self.unscored,
                "scores": scores, "skipped": dict(self.skipped), "secrets": [dict(s) for s in self.secrets],
                "exposure_method": self.exposure_method,
                "exposure_by_reps": {str(r): v for r, v in self.exposure_by_reps().items()} if self.secrets else {}}

    def to_markdown(self) -> str:
        """The tables: per score AUROC and recall (all canary rows), AUROC per repetition count,
        and, with a model, exposure and extraction per r, inserted vs twins."""
        pct = [f"{100 * q:g}%" for q in self.fractions]
        lines = [f"Planted canaries: {self.num_inserted} inserted rows ({', '.join(f'r={r}' for r in self.reps)}) "
                 f"among {self.num_rows} training rows; positives = inserted rows, negatives = the "
                 f"{self.num_original} original rows.", ""]
        if self.unscored:
            lines += [f"{self.unscored} rows are unscored (no burn-in epoch): ranked last by every score.", ""]
        lines += ["| score | AUROC | " + " | ".join(f"recall@{p}" for p in pct) + " |",
                  "|---|---|" + "---|" * len(pct)]
        for name, v in self.scores.items():
            lines.append(f"| {name} | {v['auroc']:.3f} | " + " | ".join(f"{v['recall'][p]:.3f}" for p in pct) + " |")
        lines += ["", "AUROC by repetition count (positives: the rows of canaries inserted r times):", "",
                  "| score | " + " | ".join(f"r={r}" for r in self.reps) + " |", "|---|" + "---|" * len(self.reps)]
        for name, v in self.scores.items():
            lines.append(f"| {name} | " + " | ".join(f"{v['by_reps'][r]['auroc']:.3f}" for r in self.reps) + " |")
        for name, why in self.skipped.items():
            lines.append(f"\n{name}: not computed ({why})")
        if self.secrets:
            m = self.exposure_method or {}
            how = (f"exact over all {m.get('space')} secrets" if m.get("method") == "exact" else
                   f"sampled from {m.get('sample_size')} of {m.get('space'):.3g} secrets, capped at "
                   f"{m.get('cap_bits', float('nan')):.1f} bits")
            lines += ["", f"Exposure (bits, max {m.get('max_bits', float('nan')):.1f}; {how}) and greedy extraction; "
                      f"twins are never inserted (the baseline):", "",
                      "| r | n | exposure inserted (mean, min-max) | exposure twins (mean, min-max) | "
                      "extracted inserted | extracted twins |", "|---|---|---|---|---|---|"]
            for r, v in self.exposure_by_reps().items():
                ins, tw = v.get("inserted"), v.get("twins")
                if ins is None or tw is None:
                    continue
                lines.append(f"| {r} | {ins['n']} | {ins['mean_exposure']:.1f} ({ins['min_exposure']:.1f}-"
                             f"{ins['max_exposure']:.1f}) | {tw['mean_exposure']:.1f} ({tw['min_exposure']:.1f}-"
                             f"{tw['max_exposure']:.1f}) | {ins['extracted']:.0%} | {tw['extracted']:.0%} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _measure(v: np.ndarray, positives: np.ndarray, negatives: np.ndarray, fracs: List[float]) -> Dict[str, Any]:
    return {"auroc": auroc(v[positives], v[negatives]),
            "recall": {f"{100 * q:g}%": recall_at(v, positives, q) for q in fracs}}


def report(canaries: Union[Canaries, str, os.PathLike], scores, *, reference=None, model=None,
           forward: Optional[Callable] = None, device=None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
           eps: Optional[float] = None, max_exact: int = 20_000, sample_size: int = 4096, batch_size: int = 1024,
           seed: int = 0) -> AuditReport:
    """How well each score finds the planted canaries, and, given the model, how much of each
    secret leaks.

    Args:
        canaries: what :func:`plant` returned, or the path of its :meth:`Canaries.save` JSON.
        scores: the run's :class:`gdc_ext.Scores` over all ``canaries.num_rows`` samples (every
            score of :data:`gdc_ext.SCORES` is computed with :func:`gdc_ext.score_values`; the
            reference-needing ones only with ``reference``, the cartography ones only for a state
            built with ``cartography=True``; "random" is the baseline, seeded by
            ``seed``), or a mapping {name: [num_rows] values, higher = more memorized} of your own.
        reference: [num_rows] per-sample reference losses (nats per token) for "excess" and
            "relative_excess" (e.g. :func:`gdc_ext.reference_losses`).
        model: a callable tokens [n, T] int64 -> logits [n, T, V] (or an output with ``logits``),
            e.g. the trained ``nn.Module``; put in eval mode (and back) and run without grad.
        forward: instead of ``model``, any callable tokens -> logits (e.g. a Hugging Face model
            with extra arguments).
        device: where tokens go (default: the model's parameters' device, else the CPU).
        fractions: the recall budgets (default 1 %, 5 %, 10 % of all rows).
        eps: the threshold of the "memorization" score (default the first tracked).
        max_exact, sample_size, batch_size: exposure's exact limit on ``|alphabet| ** secret_len``,
            the sampled estimate's candidates, and the rows per model call.
        seed: the "random" baseline's order and the exposure samples.

    Definitions: the module docstring (positives, negatives, AUROC, recall, exposure, extraction).
    """
    from gdc_ext.cartography import NEEDS_REFERENCE, SCORES, available_scores, score_values

    if isinstance(canaries, (str, os.PathLike)):
        canaries = Canaries.load(canaries)
    if not isinstance(canaries, Canaries):
        raise ValueError(f"canaries must be what audit.plant returned (or its saved JSON path), got {type(canaries).__name__}")
    canaries._check()
    seed = _int(seed, "seed", 0)
    max_exact = _int(max_exact, "max_exact", 1)
    sample_size = _int(sample_size, "sample_size", 1)
    batch_size = _int(batch_size, "batch_size", 1)
    fracs = [float(q) for q in fractions]
    if not fracs or not all(0.0 < q <= 1.0 for q in fracs):
        raise ValueError(f"fractions must be numbers in (0, 1], got {fractions!r}")
    N = canaries.num_rows
    values: Dict[str, np.ndarray] = {}
    skipped: Dict[str, str] = {}
    if isinstance(scores, Mapping):
        for name, v in scores.items():
            values[str(name)] = _scores_1d(v, f"scores[{name!r}]")
    elif hasattr(scores, "difficulty") and hasattr(scores, "last_loss"):
        # every score the state can give: the opt-in groups' scores (NEEDS_GROUP) only when it kept them
        can = available_scores(scores, reference)
        for name in SCORES:
            if name in NEEDS_REFERENCE and reference is None:
                skipped[name] = "needs reference="
            elif name in can:
                values[name] = score_values(scores, name, seed=seed, eps=eps, reference=reference).numpy()
    else:
        raise ValueError(f"scores must be a gdc_ext.Scores (state.scores()) or a mapping {{name: [N] values}}, got "
                         f"{type(scores).__name__}")
    for name, v in values.items():
        if len(v) != N:
            raise ValueError(f"scores: {name!r} has {len(v)} values; the planted data has num_rows = {N} samples "
                             f"(the original {canaries.num_original} + {len(canaries.inserted_ids)} inserted)")
    unscored = int(np.isnan(_scores_1d(scores.difficulty, "difficulty")).sum()) if not isinstance(scores, Mapping) else 0

    negatives = np.arange(canaries.num_original)
    pos_by_r = {r: np.array(sorted(i for c in canaries.canaries if c.reps == r for i in c.ids), dtype=np.int64)
                for r in canaries.reps}
    pos_all = np.asarray(canaries.inserted_ids, dtype=np.int64)
    table: Dict[str, Dict[str, Any]] = {}
    for name, v in values.items():
        row = _measure(v, pos_all, negatives, fracs)
        row["by_reps"] = {r: _measure(v, p, negatives, fracs) for r, p in pos_by_r.items()}
        table[name] = row

    secrets: List[Dict[str, Any]] = []
    method = None
    if model is not None or forward is not None:
        call = _logits_fn(model, forward, device)
        call._gdc_checked = True  # type: ignore[attr-defined]
        rng = np.random.default_rng(seed)
        module = model if isinstance(model, torch.nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            with torch.no_grad():
                items = ([("inserted", k, c.prefix, c.secret, c.reps) for k, c in enumerate(canaries.canaries)]
                         + [("twin", t.canary, t.prefix, t.secret, t.reps) for t in canaries.twins])
                decoded = greedy_extract(call, [it[2] for it in items], canaries.secret_len)
                for (kind, k, prefix, secret, r), dec in zip(items, decoded):
                    e = exposure(call, prefix, secret, canaries.alphabet, max_exact=max_exact,
                                 sample_size=sample_size, batch_size=batch_size, rng=rng)
                    matched = next((j for j, (a, b) in enumerate(zip(dec, secret)) if a != b), len(secret))
                    secrets.append({"kind": kind, "canary": k, "reps": r, "exposure": e["exposure"],
                                    "rank": e["rank"], "capped": e["capped"], "extracted": dec == list(secret),
                                    "matched_tokens": matched, "decoded": dec})
                    method = e
        finally:
            if module is not None:
                module.train(was_training)
        space = method["space"]
        method = {"method": method["method"], "space": space, "max_bits": method["max_bits"],
                  "sample_size": sample_size if method["method"] == "sampled" else None,
                  "cap_bits": (method["max_bits"] - math.log2(1.0 + float(space - 1) / sample_size)
                               if method["method"] == "sampled" else method["max_bits"])}
    return AuditReport(num_rows=N, num_original=canaries.num_original, num_inserted=len(canaries.inserted_ids),
                       reps=list(canaries.reps), fractions=fracs, scores=table, skipped=skipped, unscored=unscored,
                       secrets=secrets, exposure_method=method)
