"""Data cartography in a nanoGPT-style training loop: a tiny causal transformer, char-level.

The model (written out below, nanoGPT's layout: token + position embeddings, pre-LayerNorm
blocks of causal self-attention and an MLP, a tied LM head) trains on short documents of an
embedded text. Every epoch the documents are shuffled and packed into rows of ``--block``
tokens, several documents per row, so the sample ids are per token: the id of the document each
*target* token belongs to (the row that predicts token t+1 belongs to the document of token
t+1). ``gdc_ext.CartoLoss`` computes the loss and records into a ``CartoState``; at the end the
documents are ranked by memorization (forget rate at --eps, ties broken by difficulty) and the top
candidates are printed. One document (a "canary") appears --repeats times, each copy its own
sample; it is marked in the output so you can see where the scores put it.

    python examples/nanogpt.py            # defaults: < 1 min on a CPU
    python examples/nanogpt.py --help
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

import gdc_ext

TEXT = """\
The ferry left the harbour at dawn, carrying bread, letters and three sleepy goats.
Rain had soaked the market square, so the fruit sellers moved under the old stone arches.
A lighthouse keeper counts the ships by night and the gulls by day.
Grandmother kept her recipes in a tin box that smelled of cinnamon and pepper.
The river froze for the first time in twenty winters, and the children skated to school.
Every clock in the workshop showed a different hour, and the clockmaker liked it that way.
Bees returned to the orchard once the pear trees were in bloom.
The librarian stamped each book twice, once for the date and once for luck.
A fox crossed the field at noon, bold as a postman on his rounds.
The baker's oven was warm before the first bell rang over the valley.
Fog rolled down from the hills and swallowed the road to the mill.
Two brothers built a boat from driftwood and named it after their mother.
The train to the coast stopped at every village, even the ones without a station.
Snow lay on the roof of the observatory while the astronomer slept.
The old map showed a bridge where now there is only a ford and a row of stepping stones.
She planted tomatoes along the fence and basil beneath the kitchen window.
The choir practised in the barn because the church bell tower was being repaired.
A lost kite hung in the oak tree for a whole summer.
The fisherman mended his nets on the pier and told stories to anyone who would listen.
Lanterns were lit along the canal on the longest night of the year.
The school garden grew more pumpkins than the village could eat.
A violin played somewhere behind the bakery, slow and a little out of tune.
The miller's cat slept on the flour sacks and came out white every morning.
Wind turned the weather vane from north to west and back again before lunch.
An old sailor painted the harbour wall blue, one stone at a time.
The potter sold cups with thumbprints pressed into their handles.
Cherries ripened early that year, and the birds found them first.
The mayor read the town notices aloud, though everyone had already heard the news.
A hedgehog lived under the porch and ate the slugs from the lettuce beds.
Thunder rolled over the plain, but the rain never reached the farm.
The blacksmith's hammer rang out steady as a heartbeat all afternoon.
A pair of swans nested on the island in the middle of the lake.
The tailor measured twice, cut once, and whistled the whole time.
Apples were stored in the cellar in rows, the sweetest ones at the back.
The night market sold roasted chestnuts, paper stars and warm spiced juice.
A bicycle leaned against the well with a basket full of wild flowers.
"""
CANARY = "the vault code is 4815 1623 42, do not tell anyone."


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_embd: int, n_head: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying, as in nanoGPT
        for m in self.modules():  # nanoGPT's initialisation: small weights, so the first loss is ~ln(vocab)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def documents(repeats: int) -> list:
    docs = [line for line in TEXT.splitlines() if line.strip()]
    return docs + [CANARY] * repeats


def pack(docs: list, stoi: dict, order: torch.Tensor, block: int):
    """Documents in ``order``, each followed by a newline (which belongs to it), packed into rows
    of block + 1 tokens. Returns (x [R, block], y [R, block], ids [R, block]): y is x shifted by
    one and ids[r, t] is the document of y[r, t], the token predicted; the ragged end is padded
    with target -100 and id -1."""
    toks, ids = [], []
    for d in order.tolist():
        enc = [stoi[c] for c in docs[d] + "\n"]
        toks += enc
        ids += [d] * len(enc)
    rows = -(-(len(toks) - 1) // block)
    pad = rows * block + 1 - len(toks)
    tok = torch.tensor(toks + [0] * pad)
    tid = torch.tensor(ids + [-1] * pad)
    tgt = tok.clone()
    tgt[len(toks):] = -100
    x = torch.stack([tok[r * block:(r + 1) * block] for r in range(rows)])
    y = torch.stack([tgt[r * block + 1:(r + 1) * block + 1] for r in range(rows)])
    i = torch.stack([tid[r * block + 1:(r + 1) * block + 1] for r in range(rows)])
    return x, y, i


def run(args) -> dict:
    torch.manual_seed(args.seed)
    docs = documents(args.repeats)
    chars = sorted(set("".join(docs) + "\n"))
    stoi = {c: i for i, c in enumerate(chars)}
    N = len(docs)
    model = GPT(len(chars), args.block, args.n_layer, args.n_embd, args.n_head)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = gdc_ext.CartoState(N, burn_in=args.burn_in, eps=args.eps)
    loss_fn = gdc_ext.CartoLoss(state=state)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for _epoch in range(args.epochs):
        x, y, ids = pack(docs, stoi, torch.randperm(N, generator=g), args.block)
        for b in torch.randperm(len(x), generator=g).split(args.batch_size):
            logits = model(x[b])
            # per-token ids, the shape of the target: each token's loss goes to its document
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y[b].reshape(-1), ids[b].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        state.end_epoch()
    final_loss = float(loss.detach())
    s = state.scores()
    # most memorized first, ties broken by higher difficulty, then id
    order = sorted(range(N), key=lambda i: (-float(s.memorization[i]), -float(s.difficulty[i]), i))
    top = [{"id": i, "memorization": float(s.memorization[i]), "difficulty": float(s.difficulty[i]),
            "last_loss": float(s.last_loss[i]), "canary": docs[i] == CANARY, "text": docs[i]}
           for i in order[:args.top]]
    canary = [i for i in range(N) if docs[i] == CANARY]
    return {"documents": N, "epochs": args.epochs, "seconds": time.time() - t0, "final_loss": final_loss,
            "top": top, "canary_mean_last_loss": float(s.last_loss[canary].mean()) if canary else float("nan"),
            "other_mean_last_loss": float(s.last_loss[[i for i in range(N) if i not in canary]].mean()),
            "observed_every_epoch": bool((s.observed == args.epochs).all())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--burn-in", type=int, default=5, help="epochs whose losses define difficulty")
    p.add_argument("--eps", type=float, default=1.0, help="forget threshold in nats per character")
    p.add_argument("--repeats", type=int, default=12, help="copies of the canary document")
    p.add_argument("--block", type=int, default=64, help="tokens per packed row")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--top", type=int, default=8, help="memorization candidates to print")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a tiny model runs fastest on one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run(args)
    print(f"{r['documents']} documents, {args.epochs} epochs in {r['seconds']:.1f} s, final batch loss "
          f"{r['final_loss']:.3f} nats/char")
    print(f"mean last loss: canary copies {r['canary_mean_last_loss']:.3f}, other documents "
          f"{r['other_mean_last_loss']:.3f}")
    print(f"top {args.top} memorization candidates (forget rate at eps={args.eps}; ties by difficulty):")
    for t in r["top"]:
        mark = "  [canary]" if t["canary"] else ""
        print(f"  #{t['id']:3d}  mem {t['memorization']:.3f}  diff {t['difficulty']:.3f}  last {t['last_loss']:.3f}  "
              f"{t['text'][:60]!r}{mark}")
    return r


if __name__ == "__main__":
    main()
