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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpuzzle_cli.errors import UserError

if TYPE_CHECKING:
    from cellpuzzle_cli.manifest import Manifest

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


_SHARD_FILE = re.compile(r"^shard-(\d+)-of-(\d+)\.jsonl$")


def missing_shards(files: Sequence[Path]) -> list[str]:
    """The shard files a set of `shard-i-of-n.jsonl` files lacks for a whole run (e.g.
    `shard-1-of-2.jsonl` beside `shard-0-of-2.jsonl` alone); files of other names are no shards."""
    seen: dict[int, set[int]] = {}
    for f in files:
        match = _SHARD_FILE.match(Path(f).name)
        if match:
            seen.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    return [shard_filename(i, n) for n, have in sorted(seen.items()) for i in range(n)
            if i not in have]


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


def first_puzzles(records: Sequence[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """`predict --limit N`: the first N puzzles of the set in the canonical order above (the
    order shards are dealt in), so the same N every time, whatever the file's order, and a
    larger N (or no limit) extends the same set. Shards then split these N as they split all."""
    ranked = sorted(records, key=lambda r: order_key(r["puzzle_id"]))
    return ranked if limit is None else ranked[:limit]


def shard_from_options(shard: str | None, ray: bool, num_shards: int | None,
                       ray_address: str | None) -> Shard:
    """The shard this command runs (`--shard i/n`), or with `--ray` the first of
    `--num-shards` (Ray runs them all): the options checked against each other."""
    if ray:
        if shard is not None:
            raise UserError("--ray runs every shard itself: drop --shard and give --num-shards N.")
        if num_shards is None:
            raise UserError("--ray needs --num-shards N: the number of shards to run as Ray tasks "
                            "(e.g. one per GPU).")
        return parse_shard(f"0/{num_shards}")
    if num_shards is not None or ray_address is not None:
        raise UserError("--num-shards and --ray-address go with --ray. Without --ray, run one "
                        "shard per command with --shard i/n.")
    return parse_shard(shard)


@dataclass
class RecordedShards:
    """The shard files of the latest `predict` run, and the shards with no finished entry."""

    output_dir: str
    num_shards: int
    files: list[Path]
    missing: list[int]


def latest_run_shards(ledger: Manifest) -> RecordedShards:
    """Shard files of the latest `predict` run in the ledger, and which have not completed."""
    from cellpuzzle_cli.manifest import Kind

    latest = ledger.find(lambda e: e.command == "predict")
    if latest is None:
        raise UserError(f"No predictions given and the manifest {ledger.path} records no "
                        "`predict` run. Pass prediction files or folders, or run `cellpuzzle "
                        "predict` first.")
    output_dir = latest.params.get("output_dir")
    num_shards = int(latest.params.get("num_shards") or 1)
    if output_dir is None:
        raise UserError(f"The latest `predict` entry in {ledger.path} names no output_dir. Pass "
                        "the prediction folder explicitly.")
    names = {shard_filename(i, num_shards): i for i in range(num_shards)}
    found: dict[int, Path] = {}
    for entry in ledger.entries_of("predict"):
        p = entry.params
        if (not p.get("complete") or p.get("output_dir") != output_dir
                or int(p.get("num_shards") or 1) != num_shards):
            continue
        for out in entry.outputs_of(Kind.PREDICTIONS):
            i = names.get(Path(out.path).name)
            if i is not None and ledger.resolve(out.path).exists():
                found[i] = ledger.resolve(out.path)
    missing = [i for i in range(num_shards) if i not in found]
    return RecordedShards(str(output_dir), num_shards, [found[i] for i in sorted(found)],
                          missing)
