"""The score plot: accuracy by N, one line per run, with bootstrap bands."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cellpuzzle_cli.scoring import Report


def plot_by_n(reports: Sequence[Report], path: Path) -> None:
    """Cell accuracy and exact match by N, one line per run, written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellpuzzle_cli.io import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, title in ((axes[0], "cell_accuracy", "Cell accuracy"),
                              (axes[1], "exact_match", "Exact match")):
        for r in reports:
            ns = sorted(r.by_n)
            vals = [r.by_n[k][metric] for k in ns]
            lo = [r.by_n[k].get(f"{metric}_ci95", [v, v])[0] for k, v in zip(ns, vals)]
            hi = [r.by_n[k].get(f"{metric}_ci95", [v, v])[1] for k, v in zip(ns, vals)]
            line, = ax.plot(ns, vals, marker="o", label=r.name)
            ax.fill_between(ns, lo, hi, alpha=0.15, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("N (cells per puzzle)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (95% bootstrap band)")
    axes[1].legend(loc="best", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
