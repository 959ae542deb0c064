"""Per-sample reference losses: how predictable a sample is *without* memorizing it.

A reference ``ref_i`` (nats per token) calibrates the model's last loss into the excess score
``excess_i = ref_i - last_i`` of docs/method.md ("Scores beyond the paper"): a sample the model
finds much easier than a generic predictor does looks memorized (Carlini et al. 2021).

- :func:`unigram_reference`: mean token NLL under an add-one-smoothed unigram model fitted on all
  the given tokens.
- :func:`zlib_reference`: zlib-compressed size (level 9) of the sample's bytes, in nats per token.

Both take either the per-sample form (``samples[i]`` = the 1-D sequence of sample i's scored
target tokens; a 2-D array/tensor [N, L] is N samples of L tokens) or the batch form (an iterable
of ``(tokens [B, L], sample_ids [B] or [B, L])`` batches, the way a training loop sees the data).
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["unigram_reference", "zlib_reference"]

Chunk = Tuple[np.ndarray, np.ndarray]  # (tokens [R] int64, sample ids [R] int64), ignored tokens removed


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _int_array(x, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.size == 0:
        return a.astype(np.int64).reshape(a.shape)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    return a.astype(np.int64)


def _is_batch(item) -> bool:
    """A batch is a (tokens, sample_ids) pair whose tokens are 2-D; a sample is a 1-D sequence."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        return False
    first = item[0]
    if isinstance(first, (bytes, str)):
        return False
    try:
        return _to_numpy(first).ndim == 2
    except Exception:  # ragged: not an array at all
        return False


def _classify(samples, name: str = "samples") -> str:
    """'array' (a 2-D [N, L] array/tensor), 'list' (a sized sequence of samples) or 'batches'.
    Rejects one-shot iterators (the unigram reference reads the data twice)."""
    if hasattr(samples, "ndim") and hasattr(samples, "shape"):
        if samples.ndim != 2:
            raise ValueError(f"{name} as an array must be 2-D [N, L] (N samples of L tokens), got shape "
                             f"{tuple(samples.shape)}")
        return "array"
    if isinstance(samples, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of samples or an iterable of (tokens, sample_ids) batches, "
                         f"got a single {type(samples).__name__}")
    try:
        it = iter(samples)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of samples or an iterable of (tokens, sample_ids) batches, "
                         f"got {type(samples).__name__}") from None
    if it is samples:
        return "iterator"
    first = next(it, None)
    if first is not None and _is_batch(first):
        return "batches"
    return "list"


def _sample_tokens(s, i: int, ignore_index: int) -> np.ndarray:
    a = _int_array(s, f"samples[{i}]")
    if a.ndim != 1:
        raise ValueError(f"samples[{i}] must be a 1-D sequence of token ids, got shape {a.shape}")
    return a[a != ignore_index]


def _batch_chunk(batch, b: int, ignore_index: int, num_samples: Optional[int]) -> Chunk:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"samples: batch {b} must be a (tokens [B, L], sample_ids [B] or [B, L]) pair")
    tok = _int_array(batch[0], f"samples: batch {b} tokens")
    ids = _int_array(batch[1], f"samples: batch {b} sample_ids")
    if tok.ndim != 2:
        raise ValueError(f"samples: batch {b} tokens must be 2-D [B, L], got shape {tok.shape}")
    if ids.shape == tok.shape[:1]:
        ids = np.broadcast_to(ids[:, None], tok.shape)
    elif ids.shape != tok.shape:
        raise ValueError(f"samples: batch {b} sample_ids must be [B] or [B, L] = {tok.shape}, got shape {ids.shape}")
    keep = tok != ignore_index
    tok, ids = tok[keep], ids[keep]
    if ids.size and ids.min() < 0:
        raise ValueError(f"samples: batch {b} sample_ids must be >= 0 on scored tokens, got {int(ids.min())}")
    if num_samples is not None and ids.size and ids.max() >= num_samples:
        raise ValueError(f"samples: batch {b} has sample id {int(ids.max())} >= num_samples = {num_samples}")
    return tok, ids


def _chunks(samples, kind: str, ignore_index: int, num_samples: Optional[int]) -> Callable[[], Iterator[Chunk]]:
    """A factory of fresh passes over the data as (tokens, ids) chunks, ignored tokens removed."""
    if kind in ("array", "list"):
        def per_sample():
            for i, s in enumerate(samples):
                t = _sample_tokens(s, i, ignore_index)
                yield t, np.full(t.shape, i, dtype=np.int64)
        return per_sample

    def per_batch():
        for b, batch in enumerate(samples):
            yield _batch_chunk(batch, b, ignore_index, num_samples)
    return per_batch


def _check_tokens(tok: np.ndarray, ignore_index: int, vocab_size: Optional[int]) -> None:
    if tok.size and tok.min() < 0:
        raise ValueError(f"samples: token ids must be >= 0 (or ignore_index = {ignore_index}), got {int(tok.min())}")
    if vocab_size is not None and tok.size and tok.max() >= vocab_size:
        raise ValueError(f"vocab_size = {vocab_size} is smaller than a token id + 1 (largest id {int(tok.max())})")


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    return a if len(a) >= n else np.concatenate([a, np.zeros(n - len(a), dtype=a.dtype)])


def unigram_reference(samples, vocab_size: Optional[int] = None, ignore_index: int = -100,
                      num_samples: Optional[int] = None) -> np.ndarray:
    """Each sample's mean token NLL (nats) under an add-one-smoothed unigram model of all tokens.

    ``p(v) = (count(v) + 1) / (total + V)``, counts over all given (non-ignored) tokens, V =
    ``vocab_size`` or the largest id + 1; ``ref_i = -(1 / n_i) sum_t log p(v_t)`` over sample i's
    n_i tokens.

    Args:
        samples: per-sample form: ``samples[i]`` is the 1-D sequence (list, array or tensor) of
            sample i's scored target tokens, or a 2-D array/tensor [N, L]; or batch form: a
            re-iterable (list, DataLoader, ...) of ``(tokens [B, L], sample_ids [B] or [B, L])``
            pairs (tensors or arrays). The batch form is read in two streaming passes (token
            counts, then per sample ``sum_t log(count(v_t) + 1)``), so memory is O(N + V) whatever
            the dataset's size; a one-shot iterator (a generator) cannot be read twice and is
            rejected.
        vocab_size: V; default the largest token id + 1.
        ignore_index: target value that marks a token without loss (skipped).
        num_samples: N for the batch form (default: the largest sample id + 1); ignored otherwise.

    Returns:
        [N] float64 nats per token; NaN for a sample with no scored token.

    Raises:
        ValueError: ``vocab_size`` smaller than a token id + 1 (or < 1), a negative token id other
            than ``ignore_index``, a sample that is not 1-D, non-integer tokens, a one-shot
            iterator, a sample id out of range.
    """
    if vocab_size is not None and (int(vocab_size) != vocab_size or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if num_samples is not None and (int(num_samples) != num_samples or num_samples < 0):
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    kind = _classify(samples)
    if kind == "iterator":
        raise ValueError("samples is a one-shot iterator (e.g. a generator), but the unigram reference reads the "
                         "data twice (counts, then per-sample sums); pass a list of batches, a DataLoader or "
                         "another re-iterable")
    passes = _chunks(samples, kind, ignore_index, num_samples)
    counts = np.zeros(0, dtype=np.int64)
    n_tok = np.zeros(0, dtype=np.int64)
    n_seen = 0
    for tok, ids in passes():  # pass 1: token counts and tokens per sample
        n_seen += 1
        _check_tokens(tok, ignore_index, vocab_size)
        if tok.size:
            counts = _grow(counts, int(tok.max()) + 1)
            counts += np.bincount(tok, minlength=len(counts))
            n_tok = _grow(n_tok, int(ids.max()) + 1)
            n_tok += np.bincount(ids, minlength=len(n_tok))
    if kind == "batches":
        n_tok = _grow(n_tok, int(num_samples) if num_samples is not None else len(n_tok))
    else:  # one chunk per sample: trailing samples without a token still get a (NaN) entry
        n_tok = _grow(n_tok, n_seen)
    V = int(vocab_size) if vocab_size is not None else len(counts)
    total = int(counts.sum())
    log_c1 = np.log(_grow(counts, V).astype(np.float64) + 1.0)
    s = np.zeros(len(n_tok), dtype=np.float64)
    for tok, ids in passes():  # pass 2: sum over each sample's tokens of log(count(v) + 1)
        if tok.size:
            s += np.bincount(ids, weights=log_c1[tok], minlength=len(s))[:len(s)]
    out = np.full(len(n_tok), np.nan, dtype=np.float64)
    has = n_tok > 0
    if total:
        out[has] = math.log(total + V) - s[has] / n_tok[has]
    return out


def _sample_bytes(s, i: int, ignore_index: int) -> bytes:
    if isinstance(s, str):
        return s.encode("utf-8")
    if isinstance(s, (bytes, bytearray, memoryview)):
        return bytes(s)
    t = _sample_tokens(s, i, ignore_index)
    if t.size and t.min() < 0:
        raise ValueError(f"samples[{i}]: token ids must be >= 0 (or ignore_index = {ignore_index}), got {int(t.min())}")
    if t.size and t.max() > np.iinfo(np.int32).max:
        raise ValueError(f"samples[{i}]: token id {int(t.max())} does not fit in int32")
    return t.astype("<i4").tobytes()


def zlib_reference(samples, ignore_index: int = -100, num_tokens: Optional[Sequence[int]] = None,
                   num_samples: Optional[int] = None) -> np.ndarray:
    """Zlib reference: ``8 * len(zlib.compress(bytes_i, 9)) / n_i * ln 2`` nats per token.

    ``bytes_i`` is sample i's tokens as int32 little-endian (ignored tokens dropped), or the sample
    itself when it is ``bytes`` or ``str`` (UTF-8). A generic compressor's code length says how
    predictable the sample is without any model of the language; short samples pay zlib's fixed
    overhead (about 11 bytes), which shifts every sample alike.

    Args:
        samples: as for :func:`unigram_reference` (per-sample, 2-D [N, L], or batches of
            ``(tokens [B, L], sample_ids [B] or [B, L])``; a sample's tokens are concatenated in
            stream order, which needs memory O(total tokens); one pass, so a generator works), or
            a sequence of ``bytes``/``str`` samples.
        ignore_index: target value that marks a token without loss (dropped).
        num_tokens: [N] token counts n_i; required for ``bytes``/``str`` samples (the per-token
            normalization), optional otherwise (default: the sample's scored tokens).
        num_samples: N for the batch form (default: the largest sample id + 1).

    Returns:
        [N] float64 nats per token; NaN for a sample with no token.
    """
    kind = _classify(samples)
    blobs: List[bytes]
    if kind in ("batches", "iterator"):
        per: dict = {}
        for b, batch in enumerate(samples):
            tok, ids = _batch_chunk(batch, b, ignore_index, num_samples)
            _check_tokens(tok, ignore_index, None)
            order = np.argsort(ids, kind="stable")
            tok, ids = tok[order], ids[order]
            cuts = np.flatnonzero(np.diff(ids)) + 1
            for t, i in zip(np.split(tok, cuts), ids[np.r_[0, cuts]] if ids.size else []):
                per.setdefault(int(i), []).append(t)
        n = num_samples if num_samples is not None else (max(per) + 1 if per else 0)
        toks = [np.concatenate(per[i]) if i in per else np.zeros(0, dtype=np.int64) for i in range(n)]
        blobs = [t.astype("<i4").tobytes() for t in toks]
        counts = np.array([t.size for t in toks], dtype=np.float64)
    else:
        blobs = [_sample_bytes(s, i, ignore_index) for i, s in enumerate(samples)]
        text = [isinstance(s, (str, bytes, bytearray, memoryview)) for s in samples] if kind == "list" else []
        if any(text) and num_tokens is None:
            raise ValueError("num_tokens is required when samples are bytes or str (the reference is per token)")
        counts = np.array([len(b) / 4 for b in blobs], dtype=np.float64)
    if num_tokens is not None:
        nt = _to_numpy(num_tokens).astype(np.float64)
        if nt.shape != (len(blobs),):
            raise ValueError(f"num_tokens must be [N] = [{len(blobs)}], got shape {nt.shape}")
        if (nt < 0).any() or not np.isfinite(nt).all():
            raise ValueError("num_tokens must be finite and >= 0")
        counts = nt
    out = np.full(len(blobs), np.nan, dtype=np.float64)
    for i, (b, n) in enumerate(zip(blobs, counts)):
        if n > 0 and b:
            out[i] = 8.0 * len(zlib.compress(b, 9)) / n * math.log(2.0)
    return out

