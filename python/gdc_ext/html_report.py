"""One self-contained HTML page over a run's scores: ``gdc report STATE --html report.html``.

The page holds the data map(s), a histogram of every score, the quadrant counts and a sortable,
filterable table of the top samples by the chosen score with their text (when a dataset is
given). Everything is inline: CSS and JavaScript in the page, figures as base64 PNG (matplotlib),
and a Content-Security-Policy that forbids every network request, so it opens offline, from an
e-mail attachment or a CI artefact, and shows the same thing anywhere. Every value taken from the
data (text, paths, names) is HTML-escaped.

matplotlib is imported on use (by :func:`build_report`), never by ``import gdc_ext``.
"""
from __future__ import annotations

import base64
import html
import io
import os
from typing import List, Optional

import numpy as np

from gdc_ext.cartography import (DEFAULT_REFERENCE_SCORE, DEFAULT_SCORE, NEEDS_REFERENCE, QUADRANT_NAMES, SCORE_LABELS,
                                 SCORES, resolve_eps, score_values, top_k)

__all__ = ["build_report", "write_report"]

# The data maps draw at most this many points (a seeded sample): a 1e8-sample map is a blur anyway.
_MAX_POINTS = 20000
# The histograms are of at most this many samples (a seeded sample), so that a report over 1e8
# samples holds a few arrays of N, not one per score.
_MAX_HIST = 1_000_000

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px;color:#222;
background:#fff;max-width:1500px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px;line-height:1.5} .meta code{background:#f3f3f3;padding:0 3px;border-radius:3px}
img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:3px 7px;vertical-align:top}
th{background:#f5f5f5;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#top th{cursor:pointer;user-select:none} #top th:hover{background:#e8eef8}
#top th.asc::after{content:" \\25B2"} #top th.desc::after{content:" \\25BC"}
#top td.text div{white-space:pre-wrap;word-break:break-word;max-height:7.5em;overflow:auto;min-width:320px;max-width:720px}
#top tr:nth-child(even){background:#fafafa} .q{white-space:nowrap;font-size:12px}
.q0{color:#2a6fba}.q1{color:#b7700c}.q2{color:#c62828;font-weight:600}.q3{color:#6a3fa8}.q-1{color:#888}
.controls{margin:8px 0;font-size:13px} .controls input{width:320px;padding:4px} .controls select{padding:3px}
.missing{color:#999;font-style:italic} .note{color:#666;font-size:12px}
"""

# Sorting: a click on a header sorts by that column (numbers: highest first; text: A to Z), a
# second click reverses. Filtering: rows whose text (any cell) contains the typed string, case
# insensitive, and the chosen quadrant.
_JS = """
(function(){
  var table=document.getElementById('top'); if(!table) return;
  var tbody=table.tBodies[0], heads=table.tHead.rows[0].cells, sorted={col:-1,dir:0};
  function key(row,i,num){var c=row.cells[i], v=c.getAttribute('data-v'); if(v===null) v=c.textContent;
    if(num){var x=parseFloat(v); return isNaN(x)?-Infinity:x;} return v.toLowerCase();}
  function sortBy(i){
    var num=heads[i].getAttribute('data-type')==='num';
    var dir=sorted.col===i?-sorted.dir:(num?-1:1); sorted={col:i,dir:dir};
    var rows=Array.prototype.slice.call(tbody.rows);
    rows.sort(function(a,b){var x=key(a,i,num), y=key(b,i,num); return x<y?-dir:(x>y?dir:0);});
    rows.forEach(function(r){tbody.appendChild(r);});
    for(var j=0;j<heads.length;j++){heads[j].classList.remove('asc','desc');}
    heads[i].classList.add(dir>0?'asc':'desc');
  }
  for(var i=0;i<heads.length;i++){(function(i){heads[i].addEventListener('click',function(){sortBy(i);});})(i);}
  var box=document.getElementById('filter'), quad=document.getElementById('quadrant-filter'),
      shown=document.getElementById('shown');
  function filter(){
    var q=box.value.toLowerCase(), want=quad.value, n=0;
    Array.prototype.forEach.call(tbody.rows,function(r){
      var ok=(!q||r.textContent.toLowerCase().indexOf(q)>=0)&&(want===''||r.getAttribute('data-quadrant')===want);
      r.hidden=!ok; if(ok) n++;});
    shown.textContent=n+' of '+tbody.rows.length+' rows shown';
  }
  box.addEventListener('input',filter); quad.addEventListener('change',filter); filter();
})();
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _png(fig) -> str:
    """The figure as an <img> with a base64 PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    return "" if np.isnan(v) else f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"


def _take(scores, ids):
    """The :class:`~gdc_ext.Scores` of the samples ``ids`` only (their rows of every column)."""
    import torch

    return scores.take(torch.as_tensor(np.asarray(ids, dtype=np.int64)))


def _histograms(cols: dict, codes: np.ndarray, note: str = ""):
    import matplotlib.pyplot as plt

    from gdc_ext.plot import QUADRANT_COLORS

    names = [n for n in ("difficulty", "last_loss", "gain", "memorization", "score_excess", "score_relative_excess",
                         "loss_std", "min_loss") if n in cols]
    ncol = 4
    nrow = (len(names) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.6 * nrow), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        v = cols[name]
        ok = np.isfinite(v) & (codes >= 0)
        data = [v[ok & (codes == c)] for c in (0, 1, 2, 3)]
        if ok.any():
            ax.hist(data, bins=40, stacked=True, log=True, color=[QUADRANT_COLORS[c] for c in (0, 1, 2, 3)])
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle("score histograms (log count), stacked by quadrant" + note, fontsize=10)
    return fig


def build_report(scores, *, by: Optional[str] = None, reference=None, alpha_d: float = 0.75, alpha_m: float = 0.75,
                 eps: Optional[float] = None, eps_index: Optional[int] = None, seed: int = 0, top: int = 50,
                 dataset: Optional[str] = None, text_field: str = "text", id_field: Optional[str] = None,
                 texts: Optional[List[Optional[str]]] = None, source: Optional[str] = None,
                 reference_source: Optional[str] = None, title: Optional[str] = None) -> str:
    """The report page (a str of HTML) for ``scores`` (a :class:`~gdc_ext.Scores`).

    by: the score of the memorized axis and of the table's order (one of
        :data:`gdc_ext.cartography.SCORES`; default :data:`DEFAULT_SCORE`, or
        :data:`DEFAULT_REFERENCE_SCORE` with a ``reference`` [N], nats per token).
    top: the number of samples in the table: the highest scores first (ties by higher d, then id).
    dataset, text_field, id_field: where the samples' text is read (:func:`gdc_ext.texts.read_texts`;
        only the rows in the table), or ``texts``: the table's texts already read, one per row of
        the table in order.
    source, reference_source, title: shown in the header (the state and reference files).
    """
    from gdc_ext.cartography import score_columns
    from gdc_ext.plot import data_map
    from gdc_ext.texts import clip, read_texts

    if by is None:
        by = DEFAULT_REFERENCE_SCORE if reference is not None else DEFAULT_SCORE
    if by not in SCORES:
        raise ValueError(f"by must be one of {', '.join(map(repr, SCORES))}, got {by!r}")
    if by in NEEDS_REFERENCE and reference is None:
        raise ValueError(f"by={by!r} needs reference=: [N] per-sample reference losses (nats per token)")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0:
        raise ValueError(f"top must be an int >= 0, got {top!r}")
    eps = resolve_eps(scores, eps=eps, eps_index=eps_index)
    eps = scores.eps[0] if eps is None else eps
    N = int(scores.difficulty.shape[0])
    score = score_values(scores, by, seed=seed, eps=eps, reference=reference).numpy()
    q = scores.quadrants(alpha_d, alpha_m, eps=eps, by=by, reference=reference, seed=seed)
    codes = q.codes.numpy().astype(np.int64)
    ids = [int(i) for i in top_k(score, int(top), scores.difficulty).numpy() if not np.isnan(score[i])]
    if reference is not None:
        from gdc_ext.state import check_reference

        reference = check_reference(reference, N)

    def columns_of(rows):  # every column for the samples ``rows`` only, m and forgets at the report's eps
        sub = _take(scores, rows)
        cols = score_columns(sub, None if reference is None else reference[rows], seed=seed)
        cols["memorization"] = sub.memorization_at(eps).double().numpy()
        cols["forgets"] = sub.forgets_at(eps).numpy().astype(np.int64)
        return cols

    table = columns_of(ids)
    if N > _MAX_HIST:
        sample = np.sort(np.random.default_rng(seed).choice(N, size=_MAX_HIST, replace=False))
        note = f" (a seeded sample of {_MAX_HIST:,} of the {N:,} samples)"
    else:
        sample, note = np.arange(N), ""
    hist_cols = columns_of(sample)
    if texts is None and dataset is not None:
        texts = read_texts(dataset, ids, text_field=text_field, id_field=id_field, num_samples=N)
    if texts is not None and len(texts) != len(ids):
        raise ValueError(f"texts: {len(texts)} texts for the {len(ids)} rows of the table")

    # ---------------------------------------------------------------- figures
    figures = [_png(data_map(scores, alpha_d=alpha_d, alpha_m=alpha_m, eps=eps, by=by, reference=reference,
                             seed=seed, max_points=_MAX_POINTS, quadrants=q))]
    if by != "memorization":  # the paper's map beside the chosen score's
        figures.append(_png(data_map(scores, alpha_d=alpha_d, alpha_m=alpha_m, eps=eps, by="memorization",
                                     seed=seed, max_points=_MAX_POINTS)))
    figures.append(_png(_histograms(hist_cols, codes[sample], note)))

    # ---------------------------------------------------------------- header
    scored = int((codes >= 0).sum())
    meta = [f"state <code>{_esc(source)}</code>" if source else None,
            f"N = {N} samples ({scored} scored), {scores.epoch} epochs, burn-in {scores.burn_in}, eps = {eps:g} nats",
            f"score (<code>--by {_esc(by)}</code>): {_esc(SCORE_LABELS[by])}"
            + (f", reference <code>{_esc(reference_source)}</code>" if reference_source else
               (", with a reference" if reference is not None else "")),
            f"quadrants: tau_d = {_fmt(q.tau_d)} (alpha_d = {alpha_d:g}), tau_m = {_fmt(q.tau_m)} "
            f"(alpha_m = {alpha_m:g}, on the score)",
            (f"text: <code>{_esc(dataset)}</code>, field <code>{_esc(text_field)}</code>"
             + (f", sample ids from <code>{_esc(id_field)}</code>" if id_field else ", sample id = row index"))
            if dataset else ("text: none (pass <code>--dataset PATH</code> to show each sample's text)"
                             if texts is None else None)]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           # nothing may be fetched at view time: images are data: URIs, CSS and JS are inline
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
           "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_esc(title or 'gdc report')}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_esc(title or 'Generative Data Cartography report')}</h1>",
           '<div class="meta">' + "<br>".join(m for m in meta if m) + "</div>"]

    # ---------------------------------------------------------------- quadrant counts
    out.append('<h2>Quadrants</h2><table id="quadrants"><thead><tr><th>code</th><th>quadrant</th><th>n</th>'
               "<th>share</th><th>mean d</th><th>mean score</th></tr></thead><tbody>")
    d = scores.difficulty.double().numpy()
    for c in (0, 1, 2, 3, -1):
        sel = codes == c
        n = int(sel.sum())
        md = _fmt(np.mean(d[sel])) if n and c != -1 else ""
        ms = _fmt(np.mean(score[sel])) if n and c != -1 else ""
        out.append(f'<tr><td class="num">{c}</td><td class="q q{c}">{_esc(QUADRANT_NAMES[c])}</td>'
                   f'<td class="num">{n}</td><td class="num">{n / max(N, 1):.1%}</td><td class="num">{md}</td>'
                   f'<td class="num">{ms}</td></tr>')
    out.append("</tbody></table>")

    # ---------------------------------------------------------------- table
    ref_cols = [("score_excess", "excess"), ("score_relative_excess", "rel. excess")] if reference is not None else []
    columns = ([("rank", "#", "num"), ("id", "id", "num"), ("quadrant", "quadrant", "text"), ("score", "score", "num"),
                ("difficulty", "d", "num"), ("last_loss", "last loss", "num"), ("gain", "gain", "num"),
                ("memorization", "m", "num"), ("forgets", "forgets", "num"), ("transitions", "transitions", "num")]
               + [(k, label, "num") for k, label in ref_cols if k != f"score_{by}"]
               + ([("text", "text", "text")] if texts is not None else []))
    out.append(f"<h2>Top {len(ids)} samples by {_esc(by)}</h2>")
    out.append('<p class="note">Highest score first (ties by higher d, then lower id). Click a column header to sort '
               "by it (numbers: highest first; click again to reverse); type to filter the rows.</p>")
    out.append('<div class="controls"><input id="filter" type="search" placeholder="filter: text, id, quadrant ..." '
               'aria-label="filter rows"> <select id="quadrant-filter" aria-label="quadrant"><option value="">all '
               "quadrants</option>" + "".join(f'<option value="{c}">{c} {_esc(QUADRANT_NAMES[c])}</option>'
                                              for c in (0, 1, 2, 3, -1))
               + '</select> <span id="shown"></span></div>')
    out.append('<table id="top"><thead><tr>' + "".join(f'<th data-key="{k}" data-type="{t}">{_esc(label)}</th>'
                                                        for k, label, t in columns) + "</tr></thead><tbody>")
    for rank, i in enumerate(ids, 1):
        c = int(codes[i])
        values = {"rank": rank, "id": i, "score": score[i]}
        values.update({k: v[rank - 1] for k, v in table.items()})
        cells = []
        for k, _, _kind in columns:
            if k == "quadrant":
                cells.append(f'<td class="q q{c}" data-v="{c} {_esc(QUADRANT_NAMES[c])}">{_esc(QUADRANT_NAMES[c])}</td>')
            elif k == "text":
                text = texts[rank - 1]
                body = '<span class="missing">(no row with this id)</span>' if text is None else _esc(clip(text))
                cells.append(f'<td class="text"><div>{body}</div></td>')
            else:
                v = values[k]
                raw = "nan" if isinstance(v, (float, np.floating)) and np.isnan(v) else repr(v.item() if hasattr(v, "item") else v)
                cells.append(f'<td class="num" data-v="{_esc(raw)}">{_fmt(v)}</td>')
        out.append(f'<tr data-id="{i}" data-quadrant="{c}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table>")

    out.append("<h2>Data map</h2>" + "".join(f"<p>{f}</p>" for f in figures[:-1]))
    out.append("<h2>Score histograms</h2><p>" + figures[-1] + "</p>")
    out.append('<p class="note">Written by gdc_ext (<code>gdc report --html</code>). Scores: higher = more '
               "memorized; NaN / empty = unscored (never seen in a burn-in epoch).</p>")
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out)


def write_report(path, scores, **kwargs) -> str:
    """Writes :func:`build_report` (same keyword arguments) to ``path`` atomically (a reader sees
    the old file or the new one); returns the path."""
    from gdc_ext._io import write_atomic

    page = build_report(scores, **kwargs)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(page)
        os.chmod(tmp, 0o644)  # a page to share: readable like any file written with open() (temps are 0600)

    path = os.fspath(path)
    write_atomic(path, write, prefix=".gdc-report-")
    return path
