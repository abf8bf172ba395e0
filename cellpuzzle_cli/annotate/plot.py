"""annotate.png: each query's embedding coloured by label, low-confidence cells marked.

One panel per query file: the file's own `X_umap` when it has one, else a UMAP computed here
(scanpy, seeded) on at most `plot_cells` cells. Labels are written at their cells' median
position and listed with their counts, `unassigned` is grey, and cells below the confidence
mark carry a small black cross. PNG metadata is fixed, so equal runs write equal bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellpuzzle_cli.io import atomic_write_bytes

LOW_CONFIDENCE = 0.5
_GREY = "#c8c8c8"


@dataclass
class Panel:
    """One query file's points: 2-D positions, label names, confidences."""

    title: str
    xy: np.ndarray
    labels: np.ndarray        # label name per point
    confidence: np.ndarray
    embedding: str            # where the positions come from


def plot_annotation(path: Path, panels: Sequence[Panel], unassigned: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(9.5 * cols, 7 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, panel, unassigned)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def _palette(plt, n: int) -> list:
    """tab10 (tab20 beyond 10 labels) without its greys, which `unassigned` uses."""
    colours = [c for c in plt.get_cmap("tab10" if n <= 9 else "tab20").colors
               if len({round(v, 2) for v in c}) > 1]
    return [colours[i % len(colours)] for i in range(n)]


def _draw(ax, panel: Panel, unassigned: str) -> None:
    import matplotlib.pyplot as plt

    names, counts = np.unique(panel.labels, return_counts=True)
    order = [names[i] for i in np.lexsort((names, -counts)) if names[i] != unassigned]
    colours = dict(zip(order, _palette(plt, len(order))))
    size = float(np.clip(12_000 / max(1, panel.labels.size), 1.0, 30.0))
    for name in [unassigned, *order]:
        hit = panel.labels == name
        if hit.any():
            ax.scatter(panel.xy[hit, 0], panel.xy[hit, 1], s=size, lw=0,
                       color=colours.get(name, _GREY),
                       label=f"{name} ({int(hit.sum()):,})")
    low = panel.confidence < LOW_CONFIDENCE
    if low.any():
        ax.scatter(panel.xy[low, 0], panel.xy[low, 1], s=size * 0.8, marker="x", lw=0.5,
                   color="black", alpha=0.6,
                   label=f"confidence < {LOW_CONFIDENCE} ({int(low.sum()):,})")
    for name in order:   # names on the plot for the larger groups; all are in the legend
        if (panel.labels == name).sum() < 0.01 * panel.labels.size:
            continue
        centre = np.median(panel.xy[panel.labels == name], axis=0)
        ax.text(centre[0], centre[1], name, fontsize=9, weight="bold", ha="center",
                va="center", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.7,
                                   "lw": 0})
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel(f"{panel.embedding} 1")
    ax.set_ylabel(f"{panel.embedding} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
              markerscale=max(1.0, 6 / math.sqrt(size)))
