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

SYSTEM_PROMPT = (
    "You are an expert in single-cell biology. The user gives you several cells from one donor, "
    "each described by its most highly expressed genes in descending order, and a list of "
    "candidate cell types. Every candidate belongs to exactly one cell and every cell has exactly "
    "one candidate. Reason about marker genes and the donor context, then commit to one complete "
    "assignment.\n"
    "Reply in exactly this layout:\n"
    "<think>\nyour reasoning\n</think>\n"
    "<answer>type of Cell 1 | type of Cell 2 | ... | type of the last cell</answer>\n"
    "Inside <answer>, list the candidate names exactly as written, in cell order, separated by ' | '."
)

CANDIDATES_HEADER = "Candidate cell types (use each exactly once):"
_CELL_LINE = re.compile(r"^\s*Cell\s+(\d+)\s*:\s*(.*?)\s*$", re.IGNORECASE)


def load_system_prompt(path: Path | None) -> str:
    """The shipped system message, or the text of `--system-prompt-file`."""
    if path is None:
        return SYSTEM_PROMPT
    from cellpuzzle_cli.io import read_text

    return read_text(path, "system prompt file").strip()


def format_question(context: str, cells: Sequence[Sequence[str]], candidates: Sequence[str]) -> str:
    """User message: donor context, one `Cell i: g1, g2, …` line per cell, then the candidates."""
    lines = [context.strip(), ""] if context and context.strip() else []
    lines += [f"Cell {i}: {', '.join(genes)}" for i, genes in enumerate(cells, 1)]
    lines += ["", CANDIDATES_HEADER, *candidates]
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


def check_answers(records: Sequence[dict[str, Any]], path: Path | str) -> None:
    """Every gold answer uses each candidate of its question exactly once: a model trained on
    anything else learns to break the puzzle's one rule."""
    from collections import Counter

    from cellpuzzle_cli.answer import answer_items
    from cellpuzzle_cli.errors import UserError

    for i, rec in enumerate(records, 1):
        _, candidates = parse_question(record_question(rec))
        if not candidates:
            continue  # a layout without a candidate list: nothing to check against
        items = answer_items(rec.get("assistant_msg") if rec.get("assistant_msg") is not None
                             else rec.get("answer"))
        if Counter(x.lower() for x in items) != Counter(c.lower() for c in candidates):
            name = rec.get("puzzle_id") or f"record {i}"
            raise UserError(f"Puzzle '{name}' in {path} answers '{' | '.join(items)}', which is "
                            f"not its candidates ({', '.join(candidates)}) each used once. Fix or "
                            "drop that puzzle; training on it would teach the model to break the "
                            "puzzle's rule.")


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
    return chat_messages(record.get("system_msg") or SYSTEM_PROMPT, record["user_msg"],
                         record.get("assistant_msg") if with_answer else None)
