"""The score plots: accuracy by N per run with chance, and a confusion heatmap per run.

Drawn to be read at a glance: runs sit side by side around each N (never on top of each
other), each with its own marker; a run whose numbers equal an earlier run's says so in the
legend; 95% intervals are error bars, and one of zero width (every resample agreed, e.g. all
right) is a wide black dash, so it shows. Heatmap cells carry their counts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellpuzzle_cli.score.report import Report

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")
_METRICS = (("cell_accuracy", "Cell accuracy", "share of cells named right"),
            ("exact_match", "Exact match", "share of puzzles all right"))
ZERO_WIDTH = "_zero-width CI"   # the dashes' label (leading "_": matplotlib's legend skips it)
_MAX_COUNTED = 30     # heatmaps with more types than this leave out the per-cell counts
_TICK_CHARS = 28      # longer type names are shortened on the heatmap's axes


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes (no timestamp, so equal plots are equal bytes); closes it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def confusion_path(path: Path) -> Path:
    """Where the heatmap goes: beside the by-N plot, `<stem>-confusion.png`."""
    path = Path(path)
    return path.with_name(f"{path.stem}-confusion.png")


def render_plots(reports: Sequence[Report]) -> dict[str, bytes]:
    """The plots as PNG bytes: "by_n", and "confusion" where runs have per-type metrics."""
    plots = {"by_n": png_bytes(by_n_figure(reports))}
    with_types = typed(reports)
    if with_types:
        plots["confusion"] = png_bytes(confusion_figure(with_types))
    return plots


def plot_by_n(reports: Sequence[Report], path: Path,
              plots: dict[str, bytes] | None = None) -> list[Path]:
    """Accuracy by N at `path` and, beside it, the confusion heatmaps (`plots`: already
    rendered); returns the files written (each atomically, as PNG)."""
    from cellpuzzle_cli.io import atomic_write_bytes

    plots = plots if plots is not None else render_plots(reports)
    written = [Path(path)]
    atomic_write_bytes(written[0], plots["by_n"])
    if "confusion" in plots:
        written.append(confusion_path(path))
        atomic_write_bytes(written[1], plots["confusion"])
    return written


def typed(reports: Sequence[Report]) -> list[Report]:
    """The runs that have per-type metrics (a heatmap each)."""
    return [r for r in reports if r.per_type is not None and r.per_type.types]


def same_as(reports: Sequence[Report]) -> dict[int, str]:
    """Run index -> the name of an earlier run with exactly the same numbers by N."""
    def key(r: Report) -> tuple:
        return tuple((n, r.by_n[n]["cell_accuracy"], r.by_n[n]["exact_match"])
                     for n in sorted(r.by_n))

    seen: dict[tuple, str] = {}
    found = {}
    for i, r in enumerate(reports):
        k = key(r)
        if k in seen:
            found[i] = seen[k]
        else:
            seen[k] = r.name
    return found


def _offsets(count: int, ns: Sequence[int]) -> list[float]:
    """Horizontal offsets that spread `count` runs around each N, within a third of the gap."""
    gaps = [b - a for a, b in itertools.pairwise(ns)] or [1]
    width = min(gaps) * (0.36 if count > 1 else 0.0)
    step = width / max(1, count - 1)
    return [(i - (count - 1) / 2) * step for i in range(count)]


def by_n_figure(reports: Sequence[Report]) -> Any:
    """Cell accuracy and exact match by N, one dodged series per run, chance dashed."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True, layout="constrained")
    all_n = sorted({n for r in reports for n in r.by_n})
    first = {n: next(r.by_n[n] for r in reports if n in r.by_n) for n in all_n}
    offsets = _offsets(len(reports), all_n)
    twins = same_as(reports)
    flat_seen = False
    for ax, (metric, title, ylabel) in zip(axes, _METRICS):
        for i, r in enumerate(reports):
            ns = sorted(r.by_n)
            xs = [n + offsets[i] for n in ns]
            vals = [r.by_n[n][metric] for n in ns]
            cis = [r.by_n[n].get(f"{metric}_ci95") or [v, v] for n, v in zip(ns, vals)]
            err = [[v - lo for v, (lo, _) in zip(vals, cis)],
                   [hi - v for v, (_, hi) in zip(vals, cis)]]
            label = r.name + (f" (same numbers as {twins[i]})" if i in twins else "")
            bars = ax.errorbar(xs, vals, yerr=err, marker=MARKERS[i % len(MARKERS)],
                               markersize=6, capsize=4, linewidth=1.6, label=label,
                               linestyle="--" if i in twins else "-")
            flat = [(x, v) for x, v, (lo, hi) in zip(xs, vals, cis) if hi - lo < 1e-9]
            if flat:  # an interval of zero width: a black dash wider than the marker
                flat_seen = True
                fx, fy = zip(*flat)
                ax.plot(fx, fy, linestyle="none", marker="_", markersize=16, label=ZERO_WIDTH,
                        markeredgewidth=1.6, color="black", zorder=bars.lines[0].zorder + 1)
        chance = [first[n][f"chance_{metric}"] for n in all_n]   # 1/N, 1/N! when closed
        ax.plot(all_n, chance, linestyle=":", color="grey", linewidth=1.8, label="chance")
        ax.set_title(f"{title} by N (95% bootstrap CI)")
        ax.set_xlabel("N (cells per puzzle)")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(all_n[0] - 0.5, all_n[-1] + 0.5)
        ax.set_ylim(-0.04, 1.06)      # 0 and 1 fully visible, never cut by the frame
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: labels[k] == "chance")  # chance last
    handles, labels = [handles[k] for k in order], [labels[k] for k in order]
    if flat_seen:
        handles.append(Line2D([], [], linestyle="none", marker="_", markersize=14,
                              markeredgewidth=1.6, color="black"))
        labels.append("CI of zero width (every resample agreed)")
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", title="run")
    return fig


def _short(name: str) -> str:
    return name if len(name) <= _TICK_CHARS else name[:_TICK_CHARS - 1] + "…"


def confusion_figure(reports: Sequence[Report]) -> Any:
    """One heatmap per run, side by side (sharing the gold axis when the runs share their gold
    types): rows gold types coloured by
    the share of their cells, every non-empty cell labelled with its count."""
    import numpy as np

    plt = _pyplot()
    rows = max(len(r.per_type.types) for r in reports)
    cols = max(len(r.per_type.columns) for r in reports)
    longest = max(len(_short(t)) for r in reports for t in r.per_type.columns)
    cell = 0.42 if cols <= 20 else 0.3                     # inches per heatmap cell
    width = len(reports) * (cols * cell + 0.35) + 0.09 * longest + 1.6
    height = rows * cell + 0.075 * longest + 1.2
    shared = all(list(r.per_type.types) == list(reports[0].per_type.types) for r in reports)
    width += 0 if shared else 0.09 * longest * (len(reports) - 1)   # each run its own labels
    fig, axes = plt.subplots(1, len(reports), figsize=(width, height), squeeze=False,
                             sharey=shared, layout="constrained")
    counted = cols <= _MAX_COUNTED
    for ax, r in zip(axes[0], reports):
        pt = r.per_type
        counts = np.asarray(pt.confusion)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(shares, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(pt.columns)), [_short(c) for c in pt.columns], rotation=50,
                      ha="right", rotation_mode="anchor", fontsize=9)
        ax.set_yticks(range(len(pt.types)), [_short(t) for t in pt.types], fontsize=9)
        ax.set_xlabel("predicted type", fontsize=10)
        ax.set_title(f"{r.name}\nmacro-F1 {pt.macro_f1:.3f}", fontsize=11)
        if counted:
            for (i, j), count in np.ndenumerate(counts):
                if count:
                    ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=7.5,
                            color="black" if shares[i, j] > 0.55 else "white")
        if ax is axes[0][0] or not shared:
            ax.set_ylabel("gold type", fontsize=10)
    bar = fig.colorbar(image, ax=list(axes[0]), shrink=0.9, pad=0.01)
    bar.set_label("share of the gold type's cells" + ("; numbers: cell counts" if counted else ""))
    return fig
