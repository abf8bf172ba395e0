"""Training curves a person can look at: the logged numbers as JSONL and a PNG, beside the model.

`sft` and `rl` train with transformers' Trainer, whose `state.log_history` mixes per-step metrics
with run timings. Here the per-step numbers get plain names and go to `metrics.jsonl` (no
timings, so two runs with the same seed write the same bytes), the timings to `timings.json`,
and the curves to `curves.png`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TIMINGS_FILE = "timings.json"
PLOT_FILE = "curves.png"

# Trainer log keys -> the names in metrics.jsonl (and the panels of the plot, in this order).
NAMES = {
    "loss": "loss",
    "eval_loss": "eval_loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "mean_token_accuracy": "token_accuracy",
    "reward": "reward_mean",
    "reward_std": "reward_std",
    "legitimate": "legitimate_share",
    "frac_reward_zero_std": "flat_group_share",
    "completions/mean_length": "response_length",
    "kl": "kl",
    "entropy": "entropy",
}
# Wall-clock facts: they differ between identical runs, so they never enter metrics.jsonl.
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second",
               "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "total_flos",
               "train_loss")
_PANELS = (("loss", "eval_loss"), ("learning_rate",), ("reward_mean",), ("legitimate_share",),
           ("response_length",), ("kl",), ("token_accuracy",), ("grad_norm",), ("n_mean",))


def split_history(history: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-step rows (`step` plus named metrics) and the run's timings, from a log history."""
    rows: dict[int, dict[str, Any]] = {}
    timings: dict[str, Any] = {}
    for entry in history:
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            if key in TIMING_KEYS:
                timings[key] = value
            elif key in NAMES and isinstance(value, (int, float)) and math.isfinite(value):
                rows.setdefault(step, {"step": step})[NAMES[key]] = value
    return [rows[s] for s in sorted(rows)], timings


def write_curves(folder: Path, history: Iterable[dict[str, Any]], title: str,
                 extra: dict[int, dict[str, Any]] | None = None) -> list[Path]:
    """Write metrics.jsonl, timings.json and curves.png into `folder`; `extra` adds per-step
    values computed outside the Trainer (e.g. the share of legitimate answers)."""
    from cellpuzzle_cli.io import write_json, write_jsonl

    rows, timings = split_history(history)
    for row in rows:
        row.update((extra or {}).get(row["step"], {}))
    folder = Path(folder)
    write_jsonl(folder / METRICS_FILE, rows)
    write_json(folder / TIMINGS_FILE, timings)
    plot_curves(rows, folder / PLOT_FILE, title)
    return [folder / METRICS_FILE, folder / TIMINGS_FILE, folder / PLOT_FILE]


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per metric that was logged, against the optimiser step; PNG written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellpuzzle_cli.io import atomic_write_bytes

    panels = [names for names in _PANELS if any(n in row for row in rows for n in names)]
    cols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, names in zip(axes.flat, panels):
        for name in names:
            points = [(row["step"], row[name]) for row in rows if name in row]
            if not points:
                continue
            steps, values = zip(*points)
            line, = ax.plot(steps, values, marker="o" if len(points) < 30 else None,
                            markersize=3, label=name)
            if name == "reward_mean":
                spread = [row.get("reward_std", 0.0) for row in rows if name in row]
                ax.fill_between(steps, [v - s for v, s in zip(values, spread)],
                                [v + s for v, s in zip(values, spread)], alpha=0.2,
                                color=line.get_color(), label="± std")
        ax.set_title(", ".join(names))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1 or names == ("reward_mean",):
            ax.legend(fontsize="small")
        for end in stage_ends(rows):  # a curriculum's stage boundaries
            ax.axvline(end, color="grey", linestyle=":", linewidth=1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "nothing was logged", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def stage_ends(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The last logged step of each curriculum stage but the last (rows carry `stage`)."""
    staged = [row for row in rows if "stage" in row]
    return [a["step"] for a, b in itertools.pairwise(staged) if a["stage"] != b["stage"]]


def finite_guard(what: str) -> Any:
    """A TrainerCallback that stops training at the first logged loss or gradient norm that is
    not finite: such a run can only publish weights of NaNs. The UserError leaves through
    `trainer.train()`, so nothing is published and the command exits 2."""
    from transformers import TrainerCallback

    from cellpuzzle_cli.errors import UserError

    class _Guard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm", "train_loss"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise UserError(
                        f"{what}: the training {key.replace('_', ' ')} became {value} at step "
                        f"{state.global_step}, so the weights are no longer numbers and nothing "
                        "was written. Lower learning_rate (or max_grad_norm), check the data, "
                        "and run again.")

    return _Guard()
