"""Open-set puzzles: candidate types that match none of a puzzle's cells.

A closed CellPuzzle offers exactly its N cells' types. Data a biologist brings breaks that:
some types of the reference are absent from the sample. `make-qa --extra-candidates K` trains
for it by adding up to K absent types to each puzzle's candidates. Where they come from:

* first the other types of the puzzle's own donor group (both cell folds with `--test-cells`):
  types really present in that sample's tissue and protocol, so no name gives itself away;
* then, when the group has fewer than K others, the other types of the same dataset. Types of
  other datasets are never used: their naming scheme or tissue could mark them as foreign.

Each extra is drawn uniformly without replacement from its pool, so every type appears at most
once in a candidate list; names that differ only in case count as one type (answers compare
case-insensitively, so both in one list would make the puzzle ambiguous). A puzzle whose pools
run dry gets fewer than K; make-qa counts those and says so. Extras are inserted at uniformly
random places in the already shuffled list, which keeps the whole list a uniform shuffle and
leaves a puzzle with no extras exactly as it was. The draws use their own generator per puzzle
(seed, group, N, index), so the cells of every puzzle are the same whatever K is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported where it is used, so the CLI starts without it
    import numpy as np


def group_pools(groups: Iterable[Any]) -> dict[str, list[list[str]]]:
    """Per group (by `name`), the pools its extras are drawn from, nearest first: the group's
    types, then its dataset's other types (each sorted, so draws depend on the seed only)."""
    groups = list(groups)
    by_dataset: dict[str, set[str]] = {}
    for g in groups:
        by_dataset.setdefault(g.dataset, set()).update(g.types)
    return {g.name: [sorted(g.types), sorted(by_dataset[g.dataset] - set(g.types))]
            for g in groups}


def draw_extras(answer_types: Sequence[str], pools: Sequence[Sequence[str]], k: int,
                rng: np.random.Generator) -> list[str]:
    """Up to `k` types absent from `answer_types` (case aside), each at most once, drawn from
    the first pool before the next."""
    taken = {t.lower() for t in answer_types}
    out: list[str] = []
    for pool in pools:
        need = k - len(out)
        if need <= 0:
            break
        free = list({t.lower(): t for t in pool if t.lower() not in taken}.values())
        if len(free) > need:
            free = [free[i] for i in sorted(rng.choice(len(free), size=need, replace=False))]
        out.extend(free)
        taken.update(t.lower() for t in free)
    return out


def add_extras(shuffled: Sequence[str], pools: Sequence[Sequence[str]], k: int,
               rng: np.random.Generator) -> tuple[list[str], int]:
    """The shuffled candidates with up to `k` extras each put at a uniformly random place (a
    uniform shuffle stays uniform), and how many were added."""
    out = list(shuffled)
    extras = draw_extras(shuffled, pools, k, rng)
    for extra in extras:
        out.insert(int(rng.integers(0, len(out) + 1)), extra)
    return out, len(extras)
