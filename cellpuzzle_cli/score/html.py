"""`score --html`: the whole report on one self-contained page a browser opens anywhere.

Everything is inside the file: the style, the tables (overall with chance and bootstrap
intervals, by N, per type, over the Cell Ontology) and the plots as PNG data URIs, so the page
can be mailed or attached to a lab notebook and still shows its images. No script, no fonts or
files fetched, and no timestamp: the same scores give the same bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellpuzzle_cli.score.report import Report, ScoreResult

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#1b1b1b;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f3f3f3;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.chance,.ci{color:#666}.warn{background:#fff6d6;border-left:4px solid #e0a800;
padding:.5em .8em;margin:.5em 0}img{max-width:100%;height:auto;display:block;margin:.6em 0}
figcaption{color:#555;font-size:.9em}figure{margin:0}
figure.wide{overflow-x:auto}figure.wide img{max-width:none}
"""


def _rows(cells: Iterable[Iterable[str]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(text: Any, numeric: bool = True, extra: str = "") -> str:
    cls = ' class="n"' if numeric else ""
    return f"<td{cls}>{escape(str(text))}{extra}</td>"


def _with_ci(metrics: dict[str, Any], key: str) -> str:
    ci = metrics.get(f"{key}_ci95")
    interval = f' <span class="ci">[{ci[0]:.3f}, {ci[1]:.3f}]</span>' if ci else ""
    return f'<td class="n">{metrics[key]:.4f}{interval}</td>'


def _overall(reports: Sequence[Report]) -> str:
    def chance(r: Report, key: str, fmt: str) -> str:
        return f'<td class="n">{r.overall[key]:.4f} <span class="chance">(chance ' \
               f'{format(r.overall[f"chance_{key}"], fmt)})</span></td>'

    rows = [
        [_td("Cell accuracy (chance)", False), *(chance(r, "cell_accuracy", ".4f")
                                                for r in reports)],
        [_td("Exact match (chance)", False), *(chance(r, "exact_match", ".2g")
                                               for r in reports)],
        [_td("Cell accuracy [95% CI]", False), *(_with_ci(r.overall, "cell_accuracy")
                                                 for r in reports)],
        [_td("Exact match [95% CI]", False), *(_with_ci(r.overall, "exact_match")
                                               for r in reports)],
        [_td("Format legitimacy", False), *(_with_ci(r.overall, "format_legitimacy")
                                            for r in reports)],
        [_td("Uniqueness", False), *(_with_ci(r.overall, "uniqueness") for r in reports)],
        [_td("Macro-F1 over gold types", False),
         *(_td(f"{r.per_type.macro_f1:.4f}" if r.per_type else "-") for r in reports)],
        [_td("Prediction length", False),
         *(_td(f"{r.overall['prediction_length']:.1f}") for r in reports)],
        [_td("Predictions", False),
         *(_td(f"{r.overall['count']}" + (f" of {r.limited['of']} (partial)" if r.limited
                                           else "")) for r in reports)],
        [_td("Failed (error)", False), *(_td(r.errors) for r in reports)],
    ]
    return _rows(rows, ["metric", *(r.name for r in reports)])


def _by_n(reports: Sequence[Report]) -> str:
    rows = []
    for n in sorted({k for r in reports for k in r.by_n}):
        cells = [_td(n)]
        for r in reports:
            m = r.by_n.get(n)
            cells.append(_td(f"{m['cell_accuracy']:.3f} / {m['exact_match']:.3f} "
                             f"({m['count']})" if m else "-"))
        first = next(r.by_n[n] for r in reports if n in r.by_n)
        cells.append(f'<td class="n chance">{first["chance_cell_accuracy"]:.3f} / '
                     f'{first["chance_exact_match"]:.3g}</td>')
        rows.append(cells)
    return _rows(rows, ["N", *(r.name for r in reports), "chance"])


def _per_type(reports: Sequence[Report]) -> str:
    runs = [r for r in reports if r.per_type is not None]
    if not runs:
        return "<p>No per-type metrics (the predictions carry no gold answers per cell).</p>"
    types = list(dict.fromkeys(t for r in runs for t in r.per_type.types))
    rows = []
    for name in types:
        support, cells = "-", []
        for r in runs:
            pt = r.per_type
            if name not in pt.types:
                cells.append(_td("-"))
                continue
            i = pt.types.index(name)
            support = str(int(pt.support[i]))
            cells.append(_td(f"{pt.f1[i]:.3f} ({pt.precision[i]:.2f} / {pt.recall[i]:.2f})"))
        rows.append([_td(name, False), _td(support), *cells])
    return _rows(rows, ["gold type", "support", *(f"{r.name}: F1 (precision / recall)"
                                                  for r in runs)])


def _hierarchy(reports: Sequence[Report]) -> str:
    trees = [(r.name, r.hierarchical) for r in reports]
    usable = [(name, t) for name, t in trees if t is not None and t.omitted is None]
    if not usable:
        reason = next((t.omitted for _, t in trees if t is not None and t.omitted), None)
        return f"<p>Omitted{': ' + escape(reason) if reason else ''}.</p>"
    rows = [[_td(label, False), *(_td(f"{getattr(t, key):.4f}") for _, t in usable)]
            for key, label in (("precision", "Hierarchical precision"),
                               ("recall", "Hierarchical recall"), ("f1", "Hierarchical F1"))]
    return _rows(rows, ["metric", *(name for name, _ in usable)])


def _image(png: bytes, alt: str, caption: str, wide: bool = False) -> str:
    """A PNG inline; `wide` ones (heatmaps of many runs) keep a readable size and scroll."""
    data = base64.b64encode(png).decode("ascii")
    size = ""
    if wide:   # the PNG's own width (bytes 16-20 of its header), drawn at 120 dpi on a 96 dpi page
        size = f' width="{int.from_bytes(png[16:20], "big") * 4 // 5}"'
    return (f'<figure class="{"wide" if wide else ""}"><img src="data:image/png;base64,{data}"'
            f' alt="{escape(alt)}"{size}><figcaption>{escape(caption)}</figcaption></figure>')


def render_html(result: ScoreResult, plots: dict[str, bytes], warnings: Sequence[str] = (),
                title: str = "cellpuzzle score") -> bytes:
    """The page for `result`; `plots` maps "by_n" / "confusion" to PNG bytes."""
    reports = result.reports
    about = (f"<p>Cell-o1 metrics with 95% bootstrap intervals "
             f"({reports[0].bootstrap.get('resamples', 0)} resamples, seed "
             f"{reports[0].bootstrap.get('seed', 0)}); chance is 1/N per cell and 1/N! per "
             f"puzzle (1/(N+K) and K!/(N+K)! with K extra candidates). Prediction length in "
             f"{escape(result.length_unit)}.</p>")
    parts = [f"<h1>{escape(title)}: {escape(', '.join(r.name for r in reports))}</h1>", about]
    parts += [f'<div class="warn">{escape(w)}</div>' for w in warnings]
    parts += ["<h2>Overall</h2>", _overall(reports),
              "<h2>By N: cell accuracy / exact match (puzzles)</h2>", _by_n(reports)]
    if "by_n" in plots:
        parts.append(_image(plots["by_n"], "Cell accuracy and exact match by N per run",
                            "Accuracy by N; bars: 95% bootstrap intervals; dotted: chance."))
    parts += ["<h2>Per gold type</h2>", _per_type(reports)]
    if "confusion" in plots:
        parts.append(_image(plots["confusion"], "Confusion matrix per run",
                            "Rows: gold types (colour: share of the type's cells); numbers: "
                            "cell counts. Scroll sideways for every run.", wide=True))
    parts += ["<h2>Over the Cell Ontology</h2>", _hierarchy(reports)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    return page.encode("utf-8")


def write_html(path: Path, result: ScoreResult, plots: dict[str, bytes],
               warnings: Sequence[str] = ()) -> Path:
    """Write the page atomically."""
    from cellpuzzle_cli.io import atomic_write_bytes

    atomic_write_bytes(Path(path), render_html(result, plots, warnings))
    return Path(path)
