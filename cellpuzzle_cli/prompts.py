"""The one owner of the puzzle text: system message, user message layout, chat messages.

Training (sft, to-parquet/rl) and inference (predict) all build prompts here, so a model is
always asked in the way it was taught. The one choice about roles: the system message goes
in the `system` turn, the puzzle in the `user` turn, everywhere (Cell-o1 mixed a user-only RL
prompt with a system-text-appended evaluation prompt; we do not).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_INTRO = ("You are an expert in single-cell biology. The user gives you several cells from one "
          "donor, each described by its most highly expressed genes in descending order, and a "
          "list of candidate cell types")
_CLOSED_RULE = (". Every candidate belongs to exactly one cell and every cell has exactly one "
                "candidate.")
_OPEN_RULE = (" that holds more types than there are cells. Every cell has exactly one candidate, "
              "no candidate belongs to more than one cell, and some candidates belong to no cell.")
_LAYOUT = (
    " Reason about marker genes and the donor context, then commit to one complete "
    "assignment.\n"
    "Reply in exactly this layout:\n"
    "<think>\nyour reasoning\n</think>\n"
    "<answer>type of Cell 1 | type of Cell 2 | ... | type of the last cell</answer>\n"
    "Inside <answer>, list the candidate names exactly as written, in cell order, separated by ' | '."
)
SYSTEM_PROMPT = _INTRO + _CLOSED_RULE + _LAYOUT       # closed puzzles: N cells, N candidates
OPEN_SYSTEM_PROMPT = _INTRO + _OPEN_RULE + _LAYOUT    # open set: N cells, more candidates

CANDIDATES_HEADER = "Candidate cell types (use each exactly once):"
OPEN_HEADER = ("Candidate cell types ({m} for {n} cells; each cell is exactly one of them, each "
               "candidate fits at most one cell, leaving {k} unused):")
_CELL_LINE = re.compile(r"^\s*Cell\s+(\d+)\s*:\s*(.*?)\s*$", re.IGNORECASE)


def load_system_prompt(path: Path | None) -> str:
    """The shipped system message, or the text of `--system-prompt-file`."""
    if path is None:
        return SYSTEM_PROMPT
    from cellpuzzle_cli.io import read_text

    return read_text(path, "system prompt file").strip()


def system_prompt(n_cells: int, n_candidates: int) -> str:
    """The shipped system message for a puzzle of this shape: closed (as many candidates as
    cells, Cell-o1's task) or open set (more candidates than cells)."""
    return SYSTEM_PROMPT if n_candidates <= n_cells else OPEN_SYSTEM_PROMPT


def candidates_header(n_cells: int, n_candidates: int) -> str:
    """The line above the candidate list; an open-set puzzle states both counts in it."""
    if n_candidates < n_cells:
        raise ValueError(f"{n_candidates} candidates cannot label {n_cells} cells one each")
    if n_candidates == n_cells:
        return CANDIDATES_HEADER
    return OPEN_HEADER.format(m=n_candidates, n=n_cells, k=n_candidates - n_cells)


def format_question(context: str, cells: Sequence[Sequence[str]], candidates: Sequence[str]) -> str:
    """User message: donor context, one `Cell i: g1, g2, …` line per cell, then the candidates."""
    lines = [context.strip(), ""] if context and context.strip() else []
    lines += [f"Cell {i}: {', '.join(genes)}" for i, genes in enumerate(cells, 1)]
    lines += ["", candidates_header(len(cells), len(candidates)), *candidates]
    return "\n".join(lines)


def record_question(record: dict[str, Any]) -> str:
    """The puzzle text of a record: `user_msg` (splits) or `question` (make-qa output)."""
    return str(record.get("user_msg") or record.get("question") or "")


def record_puzzle_id(record: dict[str, Any]) -> str:
    """A record's `puzzle_id`, or one derived from its prompt text for files without ids
    (Cell-o1's JSON, the published Parquet). predict and score's --reference both use this, so
    a file gets the same ids in both."""
    if record.get("puzzle_id") is not None:
        return str(record["puzzle_id"])
    import hashlib

    text = (record.get("system_msg") or "") + "\0" + record_question(record)
    return "sha-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def parse_question(question: str) -> tuple[list[list[str]], list[str]]:
    """Cells' gene lists and candidate types back from a user message.

    Accepts our layout and close variants (e.g. the published CellPuzzles text): candidates are
    the non-empty lines after the first line following the cells that ends with ':', or, when a
    single line, its comma/semicolon-separated items.
    """
    cells: list[list[str]] = []
    lines = question.splitlines()
    last_cell = -1
    for i, line in enumerate(lines):
        m = _CELL_LINE.match(line)
        if m:
            cells.append([g.strip() for g in m.group(2).split(",") if g.strip()])
            last_cell = i
    rest = lines[last_cell + 1:]
    header = next((j for j, line in enumerate(rest) if line.rstrip().endswith(":")), None)
    tail = rest[header + 1:] if header is not None else rest
    items = [line.strip().lstrip("-*• ").strip() for line in tail if line.strip()]
    if len(items) == 1 and re.search(r"[,;]", items[0]):
        items = [x.strip() for x in re.split(r"[,;]", items[0]) if x.strip()]
    return cells, items


def record_candidates(record: dict[str, Any]) -> list[str]:
    """A puzzle's candidate types: its `candidates` field (make-qa's records), else the list in
    its question (splits, Cell-o1's files, the published Parquet); [] when it has none."""
    listed = record.get("candidates")
    if listed is not None and not isinstance(listed, str):
        return [str(c) for c in listed]
    return parse_question(record_question(record))[1]


def answer_breaks_rule(items: Sequence[str], n_cells: int, candidates: Sequence[str]) -> bool:
    """Whether answer items break the puzzle's rule: one item per cell, each a candidate (case
    aside), no candidate twice. For a closed puzzle that is "each candidate exactly once"."""
    keys = [x.lower() for x in items]
    allowed = {c.lower() for c in candidates}
    return len(keys) != n_cells or len(set(keys)) != len(keys) or not allowed.issuperset(keys)


def check_answers(records: Sequence[dict[str, Any]], path: Path | str) -> None:
    """Every gold answer gives each cell one candidate of its question, none twice: a model
    trained on anything else learns to break the puzzle's one rule."""
    from cellpuzzle_cli.answer import answer_items
    from cellpuzzle_cli.errors import UserError

    for i, rec in enumerate(records, 1):
        cells, candidates = parse_question(record_question(rec))
        if not candidates:
            continue  # a layout without a candidate list: nothing to check against
        items = answer_items(rec.get("assistant_msg") if rec.get("assistant_msg") is not None
                             else rec.get("answer"))
        n_cells = len(cells) or len(candidates)   # no cell lines: a closed puzzle, as before
        if answer_breaks_rule(items, n_cells, candidates):
            name = rec.get("puzzle_id") or f"record {i}"
            raise UserError(f"Puzzle '{name}' in {path} answers '{' | '.join(items)}', which is "
                            f"not one type per cell ({n_cells} cells) from its candidates "
                            f"({', '.join(candidates)}), each candidate used at most once. Fix "
                            "or drop that puzzle; training on it would teach the model to break "
                            "the puzzle's rule.")


def chat_messages(system_msg: str | None, user_msg: str,
                  assistant_msg: str | None = None) -> list[dict[str, str]]:
    """Chat turns for a chat template; the assistant turn only when training."""
    messages = []
    if system_msg:
        messages.append({"role": "system", "content": system_msg})
    messages.append({"role": "user", "content": user_msg})
    if assistant_msg is not None:
        messages.append({"role": "assistant", "content": assistant_msg})
    return messages


def record_messages(record: dict[str, Any], with_answer: bool = False) -> list[dict[str, str]]:
    """Chat turns for a split record (`system_msg`, `user_msg`, `assistant_msg`)."""
    system_msg = record.get("system_msg")
    if not system_msg:   # the shipped message for the puzzle's shape (closed or open set)
        cells, candidates = parse_question(record["user_msg"])
        system_msg = system_prompt(len(cells), len(candidates))
    return chat_messages(system_msg, record["user_msg"],
                         record.get("assistant_msg") if with_answer else None)
