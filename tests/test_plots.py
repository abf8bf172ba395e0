"""Plots a person reads at a glance: what each figure holds, read from the figure's own data."""

from __future__ import annotations

import matplotlib
import pytest
from fixtures import answered, gold_records, prediction_lines

from cellpuzzle_cli.io import write_jsonl
from cellpuzzle_cli.score.report import score_runs
from cellpuzzle_cli.score.runs import collect_files

matplotlib.use("Agg")

GOLDS = ["T cell | B cell | monocyte", "B cell | monocyte | T cell | NK cell",
         "monocyte | T cell | B cell", "NK cell | B cell | T cell | monocyte"] * 5


def _run(folder, texts):
    records = gold_records(GOLDS)
    write_jsonl(folder / "shard-0-of-1.jsonl", prediction_lines(records, texts))
    return folder


@pytest.fixture
def reports(tmp_path):
    """Three runs: `model`, `copy` (the same answers) and `oracle` (every answer right)."""
    half = [answered(g) if i % 2 else answered(" | ".join(reversed(g.split(" | "))))
            for i, g in enumerate(GOLDS)]
    runs = [_run(tmp_path / "model", half), _run(tmp_path / "copy", half),
            _run(tmp_path / "oracle", [answered(g) for g in GOLDS])]
    return score_runs(collect_files(runs), resamples=200).reports


def _series(ax, name):
    """The (x, y) points of a run's line in an axes, found by its legend label."""
    for container in ax.containers:
        if container.get_label().startswith(name):
            line = container.lines[0]
            return list(line.get_xdata()), list(line.get_ydata()), line.get_marker()
    raise AssertionError(f"no series {name!r}")


def test_two_identical_runs_are_both_visible_in_the_by_n_plot(reports):
    from cellpuzzle_cli.score.plot import by_n_figure

    fig = by_n_figure(reports)
    for ax in fig.axes[:2]:
        x_model, y_model, m_model = _series(ax, "model")
        x_copy, y_copy, m_copy = _series(ax, "copy")
        assert y_model == y_copy                     # the same numbers ...
        assert all(a != b for a, b in zip(x_model, x_copy))   # ... drawn side by side
        assert m_model != m_copy                     # with their own markers
        assert ax.get_ylabel() and ax.get_xlabel() == "N (cells per puzzle)"
    legend = [t.get_text() for t in fig.legends[0].texts]
    assert "model" in legend and "copy (same numbers as model)" in legend


def test_a_zero_width_interval_is_drawn_as_a_dash(reports):
    from cellpuzzle_cli.score.plot import ZERO_WIDTH, by_n_figure

    oracle = reports[2]
    assert all(m["exact_match_ci95"] == [1.0, 1.0] for m in oracle.by_n.values())
    fig = by_n_figure(reports)
    ax = fig.axes[1]
    dashed = {(x, y) for line in ax.get_lines() if line.get_label() == ZERO_WIDTH
              for x, y in zip(line.get_xdata(), line.get_ydata())}
    xs, ys, _ = _series(ax, "oracle")
    assert set(zip(xs, ys)) <= dashed and ys == [1.0, 1.0]   # N = 3 and 4, all right
    low, high = ax.get_ylim()
    assert low < 0 and high > 1                      # 0 and 1 are inside the frame
    assert "CI of zero width (every resample agreed)" in [t.get_text()
                                                          for t in fig.legends[0].texts]


def test_heatmap_cells_carry_their_counts(reports):
    from cellpuzzle_cli.score.plot import confusion_figure

    fig = confusion_figure(reports)
    for ax, report in zip(fig.axes, reports):
        counts = report.per_type.confusion
        shown = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text())
                 for t in ax.texts}
        expected = {(i, j): int(c) for (i, j), c in
                    ((ij, counts[ij]) for ij in zip(*counts.nonzero()))}
        assert shown == expected
        assert ax.get_xlabel() == "predicted type"
        assert all(label.get_fontsize() >= 9 for label in ax.get_xticklabels())


def test_training_curves_label_every_axis_and_draw_eval_loss_as_a_marked_line():
    from cellpuzzle_cli.curves import curves_figure

    rows = [{"step": s, "loss": 3.0 - s / 10, "learning_rate": 1e-3, "grad_norm": 1.0,
             **({"eval_loss": 3.1 - s / 10} if s % 3 == 0 else {})} for s in range(1, 10)]
    fig = curves_figure(rows, "sft")
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert len(panels) == 3
    for ax in panels:
        assert ax.get_ylabel() and ax.get_xlabel() == "optimiser step"
    eval_line = next(line for line in panels[0].get_lines()
                     if line.get_label().startswith("eval loss"))
    assert list(eval_line.get_xdata()) == [3, 6, 9]
    assert eval_line.get_marker() == "D" and eval_line.get_linestyle() == "--"
    assert panels[0].get_title() == "training loss, eval loss (held-out puzzles)"
