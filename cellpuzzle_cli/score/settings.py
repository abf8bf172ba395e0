"""How runs are scored: score's settings (recorded in the manifest)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from cellpuzzle_cli.config import Check, Seed


@dataclass
class ScoreSettings:
    """The keys `score --config` files and `key=value` overrides may set."""

    cello1_compat: bool = False   # Cell-o1's script: extra items count as exact, case-sensitive
    partial: bool = False         # no input given: score the finished shards even if some miss
    bootstrap: Annotated[int, Check(0)] = 1000   # resamples for the 95% intervals (0: none)
    seed: Seed = 0
