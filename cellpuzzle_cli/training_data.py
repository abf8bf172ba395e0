"""Training puzzles as sft, to-parquet and init-model read them: the records checked, and a
held-out part that never trains.

The records are split's (or a CellPuzzles file's): `user_msg` and `assistant_msg` at least,
every answer checked against its puzzle's rule before any training (`prompts.check_answers`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import read_records
from cellpuzzle_cli.prompts import check_answers

TRAINING_FIELDS = ("user_msg", "assistant_msg")  # what sft and to-parquet need


def read_training_records(path: Path, required: Sequence[str] = TRAINING_FIELDS) -> list[dict[str, Any]]:
    """Split records (JSONL, CellPuzzles-style JSON array or Parquet) with the chat fields checked."""
    records = read_records(path)
    if not records:
        raise UserError(f"{path} holds no records. Point --data at a non-empty train split "
                        "(e.g. the train.jsonl written by `cellpuzzle split`).")
    present = set().union(*(r.keys() for r in records if isinstance(r, dict)))
    missing = [f for f in required if any(not isinstance(r, dict) or r.get(f) in (None, "")
                                          for r in records)]
    if missing:
        raise UserError(f"{path} lacks the field(s) {', '.join(missing)} in some or all records; it "
                        f"has {', '.join(sorted(present)) or 'no fields'}. Training data needs "
                        "user_msg and assistant_msg (system_msg optional): use the train.jsonl "
                        "from `cellpuzzle split` or a CellPuzzles file.")
    check_answers(records, path)
    return records


def holdout(records: Sequence[dict[str, Any]], size: float, seed: int,
            group_key: str = "group") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded (train, held-out) split; whole groups go to the held-out side when there are several.

    `size` below 1 is a fraction of the records, otherwise a count. With three or more groups
    (donors), whole groups are held out until the count is reached, so a held-out score cannot
    reward memorised donors; with fewer, or records without a group, random puzzles are.
    """
    if size < 0:
        raise UserError(f"The held-out size must be 0 or more, got {size}.")
    n = len(records)
    target = round(size * n) if size < 1 else int(size)
    if size > 0:
        target = max(target, 1)
    if target == 0:
        return list(records), []
    if target >= n:
        raise UserError(f"A held-out size of {size} leaves no training puzzles out of {n}. Use a "
                        "smaller fraction (e.g. 0.1) or count.")
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(rec.get(group_key), []).append(i)
    held: set[int] = set()
    if len(groups) >= 3 and None not in groups:
        order = sorted(groups, key=str)
        rng.shuffle(order)
        for g in order[:-1]:  # at least one group always stays in training
            if len(held) >= target:
                break
            held.update(groups[g])
    else:
        held = set(rng.sample(range(n), target))
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val
