"""The two language models of the paper's experiments, trained from scratch.

- ``LSTMLM``: the small LSTM language model of the canary experiment.
- ``GPT2LM``: a GPT-2-style decoder built from ``transformers.GPT2Config`` (imported lazily, only
  when one is built); tiny by default for the CPU, GPT-2 small (124M: 12 layers, 768 wide,
  12 heads) with ``scale="paper"``.
Both map tokens [B, L] int64 to logits [B, L, V].
"""
from __future__ import annotations

from torch import nn

__all__ = ["LSTMLM", "GPT2LM", "build_model", "GPT2_SMALL"]

GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12)


class LSTMLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, hidden: int = 192, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


class GPT2LM(nn.Module):
    def __init__(self, vocab: int, n_positions: int, n_embd: int = 128, n_layer: int = 2, n_head: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel  # lazy: only the experiments need transformers

        cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False,
                         bos_token_id=vocab - 1, eos_token_id=vocab - 1)
        self.net = GPT2LMHeadModel(cfg)

    def forward(self, x):
        return self.net(input_ids=x, use_cache=False).logits


def build_model(kind: str, vocab: int, seq_len: int, **dims) -> nn.Module:
    if kind == "lstm":
        return LSTMLM(vocab, **dims)
    if kind == "gpt2":
        return GPT2LM(vocab, n_positions=seq_len, **dims)
    raise ValueError(f"model kind must be 'lstm' or 'gpt2', got {kind!r}")
