"""Training curves a person can look at: the logged numbers as JSONL and a PNG, beside the model.

`sft` and `rl` train with transformers' Trainer, whose `state.log_history` mixes per-step metrics
with run timings. Here the per-step numbers get plain names and go to `metrics.jsonl` (no
timings, so two runs with the same seed write the same bytes), the timings to `timings.json`,
and the curves to `curves.png`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
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
           ("response_length",), ("kl",), ("token_accuracy",), ("entropy",), ("grad_norm",), ("n_mean",))
# What each panel's y axis measures, and how a series is named in its legend.
_Y_LABELS = {"loss": "loss (the training objective)", "learning_rate": "learning rate",
             "reward_mean": "reward (mean ± std per step)",
             "legitimate_share": "share of answers in the format",
             "response_length": "answer length (tokens)", "kl": "KL to the reference model",
             "token_accuracy": "share of target tokens right",
             "entropy": "entropy (nats per token)", "grad_norm": "gradient norm (L2)",
             "n_mean": "mean puzzle size N in the step"}
_LEGEND = {"loss": "training loss", "eval_loss": "eval loss (held-out puzzles)",
           "reward_mean": "reward mean"}
_MARKED_BELOW = 40     # series with fewer points than this show every point as a marker


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
    """The curves as a PNG, written atomically (no timestamp: same numbers, same bytes)."""
    import io

    from cellpuzzle_cli.io import atomic_write_bytes

    fig = curves_figure(rows, title)   # selects matplotlib's file-only backend first
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def curves_figure(rows: Sequence[dict[str, Any]], title: str) -> Any:
    """One panel per metric that was logged, against the optimiser step, each y axis saying
    what it measures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [[n for n in names if any(n in row for row in rows)] for names in _PANELS]
    panels = [names for names in panels if names]
    cols = min(3 if len(panels) <= 6 else 4, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.2 * nrows), squeeze=False,
                             layout="constrained")
    for ax, names in zip(axes.flat, panels):
        for name in names:
            _draw(ax, rows, name)
        ax.set_title(", ".join(_LEGEND.get(n, n.replace("_", " ")) for n in names),
                     fontsize="medium")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(_Y_LABELS.get(names[0], names[0].replace("_", " ")))
        ax.grid(alpha=0.3)
        if names == ["learning_rate"]:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if len(names) > 1 or names == ["reward_mean"]:
            ax.legend(fontsize="small")
        for end in stage_ends(rows):  # a curriculum's stage boundaries
            ax.axvline(end, color="grey", linestyle=":", linewidth=1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "nothing was logged", ha="center", va="center")
    fig.suptitle(title)
    return fig


def _draw(ax, rows: Sequence[dict[str, Any]], name: str) -> None:
    """One logged series: a line, with markers where the points are few; eval loss (a handful
    of evaluations) always as a dashed line with large markers, so one point still shows."""
    points = [(row["step"], row[name]) for row in rows if name in row]
    steps, values = zip(*points)
    style: dict[str, Any] = {"marker": "o" if len(points) < _MARKED_BELOW else None,
                             "markersize": 3.5}
    if name == "eval_loss":
        style = {"marker": "D", "markersize": 6, "linestyle": "--", "linewidth": 1.6}
    line, = ax.plot(steps, values, label=_LEGEND.get(name, name), **style)
    if name == "reward_mean":
        spread = [row.get("reward_std", 0.0) for row in rows if name in row]
        ax.fill_between(steps, [v - s for v, s in zip(values, spread)],
                        [v + s for v, s in zip(values, spread)], alpha=0.2,
                        color=line.get_color(), label="± std")


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


def eval_leaves_training_alone() -> Any:
    """A TrainerCallback that keeps the random state across each evaluation during training.

    Evaluating draws from torch's random generator (each new DataLoader iterator takes a seed),
    so without it the dropout masks after the first evaluation, and so the trained weights,
    would depend on how often eval loss is drawn (`eval_steps`). The state is saved when the
    Trainer decides to evaluate (after the step's other callbacks) and restored once it has."""
    import random

    import numpy as np
    import torch
    from transformers import TrainerCallback

    class _Keep(TrainerCallback):
        saved: tuple[Any, ...] | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_evaluate:
                cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
                self.saved = (torch.get_rng_state(), cuda, random.getstate(),
                              np.random.get_state())

        def on_evaluate(self, args, state, control, **kwargs):
            if self.saved is None:
                return
            cpu, cuda, python, numpy_state = self.saved
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            random.setstate(python)
            np.random.set_state(numpy_state)
            self.saved = None

    return _Keep()


def progress_callback(update: Callable[..., None]) -> Any:
    """A TrainerCallback that advances a progress bar per optimiser step and shows the loss."""
    from transformers import TrainerCallback

    class _Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            update(state.global_step, total=state.max_steps, description="sft")

        def on_step_end(self, args, state, control, **kwargs):
            update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                update(0, description=f"sft loss {logs['loss']:.3f}")

    return _Bar()
