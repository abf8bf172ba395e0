"""Test records in, prediction lines out, and resuming a shard file after a crash.

A shard file is appended one batch at a time (one `write`, then flush and fsync), so after a
kill it holds whole lines for every finished batch plus, at worst, one torn line at the end.
Resuming drops that torn tail and skips the puzzle ids already written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import atomic_write_bytes, check_unique_ids, dumps_line, read_records
from cellpuzzle_cli.predict.shards import order_key
from cellpuzzle_cli.prompts import record_puzzle_id

CELLO1_TRAIN = Path("..") / "train" / "train_data.json"   # Cell-o1's data layout


def cello1_train_file(test_file: Path) -> Path | None:
    """`../train/train_data.json` beside a test file in Cell-o1's `test/` folder, if it exists."""
    test_file = Path(test_file)
    candidate = test_file.parent / CELLO1_TRAIN
    if test_file.parent.name == "test" and candidate.is_file():
        return candidate.resolve()
    return None


def load_test_records(path: Path) -> list[dict[str, Any]]:
    """Split records (JSONL / JSON array / Parquet), checked and given the fields predict needs."""
    raw = read_records(path)
    if not raw:
        raise UserError(f"The test file {path} holds no records. Point --data at a split's "
                        "test.jsonl (made by `cellpuzzle split`).")
    records = []
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise UserError(f"Record {i} of {path} is not an object; give a split file of records.")
        rec = dict(rec)
        if "user_msg" not in rec and "question" in rec:
            rec["user_msg"] = rec["question"]
        if not rec.get("user_msg"):
            raise UserError(f"Record {i} of {path} has no 'user_msg' (the puzzle text). Give the "
                            "test.jsonl written by `cellpuzzle split`, or a file with the "
                            "CellPuzzles columns system_msg/user_msg/assistant_msg.")
        if rec.get("assistant_msg") is None and "answer" in rec:
            rec["assistant_msg"] = rec["answer"]
        rec["puzzle_id"] = record_puzzle_id(rec)
        records.append(rec)
    check_unique_ids((r["puzzle_id"] for r in records), path, "Predictions are resumed by "
                     "puzzle id, so ids must be unique; de-duplicate the file or re-run "
                     "`cellpuzzle split`.")
    return records


def puzzle_size(record: dict[str, Any]) -> int | None:
    if record.get("n") is not None:
        return int(record["n"])
    from cellpuzzle_cli.prompts import parse_question

    cells, _ = parse_question(record["user_msg"])
    return len(cells) or None


def candidate_count(record: dict[str, Any]) -> int | None:
    """How many candidates the puzzle offers (N for a closed puzzle, N+K for an open-set one),
    so `score` can give chance without the test file; None when the question lists none."""
    from cellpuzzle_cli.prompts import record_candidates

    return len(record_candidates(record)) or None


def read_done(path: Path, allowed: set[str]) -> dict[str, dict[str, Any]]:
    """Lines already in a shard file, by puzzle id; a torn last line is cut off the file."""
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    # Everything after the last newline is a line whose write was cut short.
    body = data[:data.rfind(b"\n") + 1]
    lines = body.split(b"\n")[:-1]
    done: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if number == len(lines):  # a final line garbled by a crash: predict it again
                body = body[:body.rfind(b"\n", 0, len(body) - 1) + 1]
                break
            raise UserError(f"{path}, line {number} is corrupt ({exc}) in the middle of the file, "
                            "which an interrupted run cannot cause. Delete the file or pass "
                            "--overwrite to predict this shard again.") from exc
        pid = row.get("puzzle_id")
        if pid not in allowed:
            raise UserError(f"{path} holds puzzle '{pid}', which is not in this shard of the test "
                            "set: the file comes from other data or another shard layout. Use "
                            "another -o folder, or pass --overwrite to start this shard again.")
        if pid in done:
            raise UserError(f"{path} holds puzzle '{pid}' twice. Pass --overwrite to predict "
                            "this shard again.")
        done[pid] = row
    if len(body) < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(body))
            fh.flush()
            os.fsync(fh.fileno())
    return done


class ShardWriter:
    """Appends whole batches to a shard file, durable before the next batch starts."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        data = b"".join(dumps_line(r) for r in rows)
        if not data:
            return
        with open(self.path, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def rewrite_in_order(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically rewrite a finished shard in canonical puzzle order (batches ran by length)."""
    ordered = sorted(rows, key=lambda r: order_key(r["puzzle_id"]))
    atomic_write_bytes(Path(path), b"".join(dumps_line(r) for r in ordered))
