"""The score plots: accuracy by N per run with chance, and a confusion heatmap per run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellpuzzle_cli.score.report import Report


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    import io

    from cellpuzzle_cli.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    _pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def confusion_path(path: Path) -> Path:
    """Where the heatmap goes: beside the by-N plot, `<stem>-confusion.png`."""
    path = Path(path)
    return path.with_name(f"{path.stem}-confusion.png")


def plot_by_n(reports: Sequence[Report], path: Path) -> list[Path]:
    """Accuracy by N (one line per run, chance dashed) and, beside it, confusion heatmaps.

    Returns the files written (each atomically, as PNG).
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    all_n = sorted({n for r in reports for n in r.by_n})
    first = {n: next(r.by_n[n] for r in reports if n in r.by_n) for n in all_n}
    chance = {metric: [first[n][f"chance_{metric}"] for n in all_n]   # 1/N, 1/N! when closed
              for metric in ("cell_accuracy", "exact_match")}
    for ax, metric, title in ((axes[0], "cell_accuracy", "Cell accuracy"),
                              (axes[1], "exact_match", "Exact match")):
        for r in reports:
            ns = sorted(r.by_n)
            vals = [r.by_n[k][metric] for k in ns]
            lo = [r.by_n[k].get(f"{metric}_ci95", [v, v])[0] for k, v in zip(ns, vals)]
            hi = [r.by_n[k].get(f"{metric}_ci95", [v, v])[1] for k, v in zip(ns, vals)]
            line, = ax.plot(ns, vals, marker="o", label=r.name)
            ax.fill_between(ns, lo, hi, alpha=0.15, color=line.get_color())
        ax.plot(all_n, chance[metric], linestyle="--", color="grey", label="chance")
        ax.set_title(title)
        ax.set_xlabel("N (cells per puzzle)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (95% bootstrap band)")
    axes[1].legend(loc="best", fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    written = [Path(path)]
    with_types = [r for r in reports if r.per_type is not None and r.per_type.types]
    if with_types:
        plot_confusion(with_types, confusion_path(path))
        written.append(confusion_path(path))
    return written


def plot_confusion(reports: Sequence[Report], path: Path) -> None:
    """One heatmap per run, side by side: rows gold types, each row as shares of its cells."""
    import numpy as np

    plt = _pyplot()
    k = max(len(r.per_type.types) for r in reports)
    size = max(4.0, 0.45 * k + 2.5)
    fig, axes = plt.subplots(1, len(reports), figsize=((size + 2.5) * len(reports), size + 1.5),
                             squeeze=False, layout="constrained")
    for ax, r in zip(axes[0], reports):
        pt = r.per_type
        shares = pt.confusion / np.maximum(pt.confusion.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(shares, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(pt.columns)), pt.columns, rotation=90, fontsize="x-small")
        ax.set_yticks(range(len(pt.types)), pt.types, fontsize="x-small")
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(f"{r.name} (macro-F1 {pt.macro_f1:.3f})", fontsize="small")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="share of the gold type's cells")
    _save(fig, path)
