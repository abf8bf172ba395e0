"""Judging a run: every prediction against its gold answer, as parallel arrays.

Per prediction (via `answer.judge_items`): an illegitimate layout scores 0 correct of its N,
not exact, uniqueness 0. Prediction length is counted in whitespace words or, with a local
tokenizer, in tokens; texts are counted in blocks so a big run is never held in memory whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.answer import (
    Verdict,
    answer_items,
    answer_items_lower,
    judge_items,
    record_answer,
    reward_from_verdict,
)
from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.make_qa import IDS_FIELD
from cellpuzzle_cli.prompts import record_candidates
from cellpuzzle_cli.score.runs import file_records

_LENGTH_CHUNK = 2048  # texts held at once while streaming a run
NO_ANSWER = -1        # a cell whose prediction has no item at its position



class CellPairs:
    """(gold type, predicted type) of every cell, as integer codes into one label vocabulary.

    Per-type and hierarchical metrics are functions of these pairs. Labels are compared
    case-insensitively (as the Cell-o1 metrics are) and shown with the first gold spelling seen;
    `term_ids` keeps the ontology ID each gold label came with, where records carry them.
    """

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.names: list[str] = []
        self.gold: list[int] = []
        self.pred: list[int] = []
        self.term_ids: dict[str, str] = {}

    def _code(self, key: str, shown: str) -> int:
        code = self.codes.get(key)
        if code is None:
            code = self.codes[key] = len(self.names)
            self.names.append(shown)
        return code

    def add(self, gold_lower: list[str], gold_raw: Any, predicted: list[str],
            term_ids: Any) -> None:
        if any(g not in self.codes for g in gold_lower):
            shown = answer_items(gold_raw)
            if len(shown) != len(gold_lower):
                shown = gold_lower
            for key, label in zip(gold_lower, shown):
                self._code(key, label)
        codes = self.codes
        self.gold.extend(codes[g] for g in gold_lower)
        self.pred.extend(self._code(p, p) for p in predicted[:len(gold_lower)])
        self.pred.extend([NO_ANSWER] * (len(gold_lower) - len(predicted)))
        if isinstance(term_ids, list) and len(term_ids) == len(gold_lower):
            for key, term in zip(gold_lower, term_ids):
                if term:
                    self.term_ids.setdefault(key, str(term))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.gold, dtype=np.int32), np.asarray(self.pred, dtype=np.int32)


@dataclass
class Judged:
    """Per-prediction results of one run, as parallel arrays."""

    name: str
    files: list[Path]
    puzzle_ids: list[str | None]
    n: np.ndarray
    correct: np.ndarray
    exact: np.ndarray
    legitimate: np.ndarray
    n_items: np.ndarray
    n_distinct: np.ndarray
    length: np.ndarray
    errors: int
    cells: CellPairs | None = None
    n_candidates: np.ndarray | None = None  # per prediction: N + K (N where unknown)

    @property
    def uniqueness(self) -> np.ndarray:
        """Distinct items / items per prediction (0 when illegitimate or empty)."""
        items = np.maximum(self.n_items, 1)
        return np.where(self.legitimate & (self.n_items > 0), self.n_distinct / items, 0.0)

    @property
    def reward(self) -> np.ndarray:
        """The `cello1` reward of every prediction, from the same numbers `score` reports.

        Equal to the RL reward for runs judged with `cello1_compat` (Cell-o1's case-sensitive
        repeat rule); by default an answer repeating an item in another case gets −1 here. On
        open-set puzzles the RL reward also gives −1 to an item outside the candidates, which
        prediction lines do not list; such an item only costs its cell here.
        """
        rows = zip(self.legitimate.tolist(), self.n.tolist(), self.correct.tolist(),
                   self.exact.tolist(), self.n_items.tolist(), self.n_distinct.tolist())
        return np.array([reward_from_verdict(Verdict(*row)) for row in rows], dtype=np.float64)


def judge_run(name: str, files: Sequence[Path], cello1_compat: bool = False,
              lengths: Callable[[list[str]], np.ndarray] | None = None,
              reference: dict[str, dict[str, Any]] | None = None,
              strict_files: bool = False) -> Judged:
    """Read and judge every prediction of one run.

    In folders, files whose records carry no `prediction` (configs, splits) are skipped;
    `strict_files` refuses them instead (files the user named).
    """
    owner: dict[str, Path] = {}
    ids: list[str | None] = []
    rows: list[tuple[bool, int, bool, int, int, int, int]] = []
    length_parts: list[np.ndarray] = []
    texts: list[str] = []
    used: list[Path] = []
    errors = 0
    cells = CellPairs()
    count_lengths = lengths or whitespace_words
    for path in files:
        records = file_records(path)
        first = next(records, None)
        if not isinstance(first, dict) or "prediction" not in first:
            if strict_files:
                raise UserError(f"{path} holds no predictions (records need a `prediction` field). "
                                "Give the files written by `cellpuzzle predict`.")
            continue
        used.append(path)
        for i, rec in enumerate(itertools.chain((first,), records)):
            if not isinstance(rec, dict):
                raise UserError(f"Record {i + 1} of {path} is not a JSON object. Give the files "
                                "written by `cellpuzzle predict`.")
            pid = rec.get("puzzle_id")
            if pid is not None:
                pid = str(pid)
                other = owner.get(pid)
                if other is not None:
                    where = f"both {other} and {path}" if other != path else f"{path} twice"
                    raise UserError(f"Puzzle '{pid}' has a prediction in {where}. Score each run "
                                    "separately (one folder per run, e.g. `cellpuzzle score runA/ "
                                    "runB/`) or remove the duplicate shard.")
                owner[pid] = path
            ref = reference.get(pid) if reference is not None and pid is not None else None
            gold_raw = record_answer(rec)
            if gold_raw is None and ref is not None:
                gold_raw = record_answer(ref)
            gold = answer_items_lower(gold_raw)
            if not gold:
                raise UserError(f"Record {i + 1} of {path} has no gold answer (`answer` or "
                                "`assistant_msg`). Pass --reference with the test split to take "
                                "answers from it.")
            text = rec.get("prediction")
            predicted: list[str] = []
            offered = _candidate_count(rec, ref, len(gold))
            if text is None or rec.get("error") is not None:
                errors += 1
                text = ""
                rows.append((False, 0, False, 0, 0, len(gold), offered))
            else:
                if not isinstance(text, str):
                    text = str(text)
                verdict, predicted = judge_items(text, gold, cello1_compat)
                rows.append((*verdict, len(gold), offered))
            term_ids = rec.get(IDS_FIELD)
            if term_ids is None and ref is not None:
                term_ids = ref.get(IDS_FIELD)
            cells.add(gold, gold_raw, predicted, term_ids)
            texts.append(text)
            ids.append(pid)
            if len(texts) >= _LENGTH_CHUNK:
                length_parts.append(np.asarray(count_lengths(texts), dtype=np.float64))
                texts = []
    if texts:
        length_parts.append(np.asarray(count_lengths(texts), dtype=np.float64))
    if not rows:
        raise UserError(f"No predictions found for run '{name}' in {', '.join(map(str, files))}. "
                        "Give prediction JSONL files (field `prediction`) or folders of them.")
    arr = np.array(rows, dtype=np.int64).reshape(len(rows), 7)
    return Judged(name, used, ids, arr[:, 5], arr[:, 1], arr[:, 2].astype(bool), arr[:, 0].astype(bool),
                  arr[:, 3], arr[:, 4], np.concatenate(length_parts), errors, cells, arr[:, 6])


def _candidate_count(line: dict[str, Any], ref: dict[str, Any] | None, n: int) -> int:
    """Candidates the puzzle offered: the line's `n_candidates` (predict writes it), else the
    reference record's list, else N (a closed puzzle, as every file before open sets was)."""
    count = line.get("n_candidates")
    if count is None and ref is not None:
        count = len(record_candidates(ref)) or None
    return max(int(count), n) if count is not None else n


# Byte table: 1 for the ASCII characters `str.split()` treats as whitespace
# (\t \n \v \f \r, \x1c-\x1f and space), 0 otherwise.
_SPACE_TABLE = bytes(1 if b in (9, 10, 11, 12, 13, 28, 29, 30, 31, 32) else 0 for b in range(256))


def whitespace_words(texts: Sequence[str], chunk: int = 2048) -> np.ndarray:
    """`len(t.split())` for every text; ASCII texts are counted in bulk with numpy.

    A word starts at a non-space byte preceded by a space (or the start); texts are joined with
    a space after each, so every text's segment is non-empty and words never straddle texts.
    """
    out = np.zeros(len(texts), dtype=np.int64)
    for s in range(0, len(texts), chunk):
        block = texts[s:s + chunk]
        ascii_idx = []
        for i, t in enumerate(block):
            if t.isascii():
                ascii_idx.append(i)
            else:
                out[s + i] = len(t.split())
        if not ascii_idx:
            continue
        parts = [block[i] for i in ascii_idx]
        joined = (" ".join(parts) + " ").encode("ascii")
        space = np.frombuffer(joined.translate(_SPACE_TABLE), dtype=np.bool_)
        starts = ~space
        starts[1:] &= space[:-1]
        lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        begin = np.concatenate(([0], np.cumsum(lens + 1)[:-1]))
        counts = np.add.reduceat(starts.view(np.uint8), begin, dtype=np.int32)
        out[s + np.asarray(ascii_idx)] = counts
    return out


def tokenizer_lengths(tokenizer_dir: Path) -> Callable[[list[str]], np.ndarray]:
    """Token counts with a local tokenizer (no remote code, no download)."""
    from transformers import AutoTokenizer

    path = existing_path(tokenizer_dir, "tokenizer folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a bad folder
        raise UserError(f"Could not load a tokenizer from {path} ({exc}). Give a model or tokenizer "
                        "folder holding tokenizer.json or tokenizer_config.json.") from exc

    def count(texts: list[str]) -> np.ndarray:
        out = np.zeros(len(texts), dtype=np.int64)
        step = 4096
        for s in range(0, len(texts), step):
            enc = tok(texts[s:s + step], add_special_tokens=False)["input_ids"]
            out[s:s + len(enc)] = [len(e) for e in enc]
        return out

    return count
