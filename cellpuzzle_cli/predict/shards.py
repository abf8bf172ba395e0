"""Which puzzles belong to shard i of n.

The rule: order the puzzles by `sha256(puzzle_id)` (ties, impossible in practice, by the id
itself) and deal them round-robin, so shard i takes positions i, i+n, i+2n, ... This is

* deterministic and stable: it depends only on the set of puzzle ids, never on file order,
  so re-running, resuming or re-exporting the test set gives every shard the same puzzles;
* balanced: shard sizes differ by at most one;
* a partition: every puzzle lands in exactly one shard.

Hashing first (instead of sorting ids) spreads any structure in the ids (dataset, donor, N)
evenly over the shards, so each shard costs about the same to generate.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cellpuzzle_cli.errors import UserError

_SPEC = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @property
    def filename(self) -> str:
        return shard_filename(self.index, self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_filename(index: int, count: int) -> str:
    """`shard-{i}-of-{n}.jsonl`, the file `score` looks for."""
    return f"shard-{index}-of-{count}.jsonl"


def parse_shard(text: str | None) -> Shard:
    """`"i/n"` -> Shard(i, n); None -> the whole set as shard 0/1."""
    if text is None:
        return Shard(0, 1)
    m = _SPEC.match(text)
    if not m:
        raise UserError(f"--shard '{text}' is not of the form i/n. Write e.g. --shard 0/4 for the "
                        "first of four shards (i counts from 0, so it runs 0 .. n-1).")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise UserError(f"--shard '{text}' asks for {count} shards; the number of shards n must be "
                        "at least 1 (e.g. --shard 0/4).")
    if not 0 <= index < count:
        raise UserError(f"--shard '{text}': the shard index must be between 0 and {count - 1} "
                        f"(shards count from 0), so the last of {count} shards is "
                        f"--shard {count - 1}/{count}.")
    return Shard(index, count)


def order_key(puzzle_id: str) -> tuple[str, str]:
    return hashlib.sha256(puzzle_id.encode("utf-8")).hexdigest(), puzzle_id



def select_shard(records: Sequence[dict[str, Any]], shard: Shard) -> list[dict[str, Any]]:
    """The records of `shard`, in canonical order; records need a unique `puzzle_id`."""
    ranked = sorted(records, key=lambda r: order_key(r["puzzle_id"]))
    return ranked[shard.index::shard.count]
