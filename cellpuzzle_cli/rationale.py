"""SFT targets with a reasoning block, for data that has no distilled reasoning traces.

Cell-o1 fine-tuned on o1-distilled traces; a user building puzzles from their own atlas has
none. A plain gold answer (`t1 | t2 | …`) becomes a full target in the layout the system prompt
asks for (`<think>…</think>\\n<answer>…</answer>`, see answer.py), so SFT teaches the format and
a reasoning skeleton:

- `template` (default): one line per cell naming the genes among its top genes most specific to
  its gold type (markers.MarkerStats, fitted on the training puzzles only, so held-out puzzles
  never leak into the targets), then the answer. With `k=0` genes the lines are bare
  `Cell i -> type`: for a from-scratch model an explicit per-cell anchor (the cell number it
  can look up in the question) is what makes the assignment learnable; the gene choice is not.
- `none`: an empty `<think>` block, then the answer.

A target that already holds a `<think>` block (e.g. CellPuzzles' `reasoning` split) is used as
it is in both modes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from cellpuzzle_cli.answer import THINK_OPEN, answer_items, format_prediction
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.prompts import parse_question

MODES = ("template", "none")


def cell_lines(cells: Sequence[Sequence[str]], types: Sequence[str], stats: Any, k: int) -> list[str]:
    """`Cell i: g1, g2, g3 -> type`, with the genes `stats.evidence` finds for the gold type;
    bare `Cell i -> type` when `k` is 0."""
    if k <= 0:
        return [f"Cell {i} -> {cell_type}" for i, cell_type in enumerate(types, 1)]
    lines = []
    for i, (genes, cell_type) in enumerate(zip(cells, types), 1):
        evidence = stats.evidence(list(genes), cell_type, k=k)
        because = ", ".join(evidence) if evidence else "no specific marker"
        lines.append(f"Cell {i}: {because} -> {cell_type}")
    return lines


def target_for(record: dict[str, Any], mode: str, stats: Any = None, k: int = 3) -> tuple[str, str]:
    """The assistant target for one record and how it was made (`kept`, `template`, `empty`)."""
    text = str(record["assistant_msg"])
    if THINK_OPEN in text:
        return text, "kept"
    items = answer_items(text)
    if mode == "template" and stats is not None:
        cells, _ = parse_question(str(record["user_msg"]))
        if cells and len(cells) == len(items):
            return format_prediction("\n".join(cell_lines(cells, items, stats, k)), items), "template"
    return format_prediction("", items), "empty"


def build_targets(records: Sequence[dict[str, Any]], mode: str,
                  fit_on: Sequence[dict[str, Any]] | None = None,
                  k: int = 3) -> tuple[list[str], dict[str, int]]:
    """Targets for `records`, the template's statistics fitted on `fit_on` (the training part)."""
    if mode not in MODES:
        raise UserError(f"Unknown rationale mode '{mode}'. Use one of: {', '.join(MODES)}.")
    stats = None
    needs_stats = mode == "template" and any(THINK_OPEN not in str(r["assistant_msg"])
                                             for r in records)
    if needs_stats:
        from cellpuzzle_cli.markers import MarkerStats

        try:
            stats = MarkerStats.fit(fit_on if fit_on is not None else records)
        except UserError as exc:
            raise UserError(f"{exc} Or train without reasoning templates: --rationale none.") from exc
    made = [target_for(r, mode, stats, k) for r in records]
    return [t for t, _ in made], dict(Counter(how for _, how in made))
