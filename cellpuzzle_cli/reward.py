"""The RL reward, for verl (`compute_score`) and TRL (`reward_funcs`).

Both judge a completion with `cellpuzzle_cli.answer.judge`, the function behind `score`'s
per-prediction metrics, so what RL optimises is what `score` reports. Value: −1 for an
illegitimate layout, a wrong number of items (one per cell) or a repeated item; otherwise
(cell accuracy + exact)/2 (variant `cello1`, the default), or `partial` / `exact` alone.

Open-set puzzles (more candidates than cells, `make-qa --extra-candidates`): the gold answer
no longer tells which types were offered, so to-parquet records them in
`extra_info.candidates`; verl passes `extra_info` to `compute_score` and the TRL backend passes
the `candidates` column, and an item that is none of them gets −1. Closed puzzles carry no
candidate list there and are judged exactly by Cell-o1's rule (which never saw candidates).

Repeats: `partial` and `exact` count items that differ only in case (`X | x`) as a repeat
(−1), like `score`; `cello1` follows Cell-o1's reward, which compares case-sensitively and so
gives such an answer partial credit, exactly as `score --cello1-compat` counts it.

When `CELLPUZZLE_REWARD_LOG` names a file, `compute_score` appends its first calls in each
process there (one JSON line each). `rl` sets it for verl runs: it is how the reward canary
knows that verl really called this function, and what tests compare verl's scores with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from cellpuzzle_cli.answer import (
    DEFAULT_VARIANT,
    answer_items,
    check_variant,
    judge,
    reward_from_verdict,
)


def reward(completion: str | None, ground_truth: str | Sequence[str],
           variant: str = DEFAULT_VARIANT, candidates: Sequence[str] | None = None) -> float:
    """Reward of one completion text against a gold answer (`"t1 | t2"` or a full answer text);
    with `candidates`, an item outside them gets −1."""
    cased = check_variant(variant) == "cello1"   # Cell-o1's case-sensitive repeat rule
    verdict = judge(completion, answer_items(ground_truth), cased, _names(candidates))
    return reward_from_verdict(verdict, variant)


def _names(candidates: Any) -> list[str] | None:
    """Candidates as plain strings; verl hands Parquet lists over as numpy arrays."""
    return None if candidates is None else [str(c) for c in candidates]


REWARD_LOG_ENV = "CELLPUZZLE_REWARD_LOG"
REWARD_LOG_LIMIT = 64  # calls logged per process: enough to prove the calls, bounded on a cluster
_logged_calls = 0


def _log_call(record: dict[str, Any]) -> None:
    """Append one call to the reward log, if one is asked for; never fails the reward."""
    global _logged_calls
    path = os.environ.get(REWARD_LOG_ENV)
    if not path or _logged_calls >= REWARD_LOG_LIMIT:
        return
    _logged_calls += 1
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), **record}, default=str) + "\n")
    except OSError:
        pass


def compute_score(data_source: str | None, solution_str: str, ground_truth: Any,
                  extra_info: dict[str, Any] | None = None, **_: Any) -> float:
    """verl's custom-reward entry point; any `data_source` is accepted (ours is `cellpuzzle`).

    `extra_info["reward_variant"]` picks a variant per example; `extra_info["candidates"]`
    (open-set puzzles) the types an answer may use.
    """
    info = extra_info or {}
    variant = info.get("reward_variant") or DEFAULT_VARIANT
    if isinstance(ground_truth, dict):  # tolerate reward_model dicts passed whole
        ground_truth = ground_truth.get("ground_truth", "")
    value = reward(solution_str, ground_truth, variant, info.get("candidates"))
    _log_call({"data_source": data_source, "ground_truth": ground_truth, "variant": variant,
               "solution": solution_str, "score": value})
    return value


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a string, or chat turns whose last assistant turn is the answer."""
    if completion is None or isinstance(completion, str):
        return completion or ""
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    turns = [t for t in completion if isinstance(t, dict)]
    for turn in reversed(turns):
        if turn.get("role", "assistant") == "assistant":
            return str(turn.get("content") or "")
    return str(turns[-1].get("content") or "") if turns else ""


def make_trl_reward(variant: str = DEFAULT_VARIANT) -> Callable[..., list[float]]:
    """A TRL `reward_funcs` function for `variant`; its `__name__` labels TRL's reward logs."""
    check_variant(variant)

    def fn(completions: Sequence[Any], ground_truth: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(completions) != len(ground_truth):
            raise ValueError(f"{len(completions)} completions but {len(ground_truth)} ground truths")
        candidates = kwargs.get("candidates") or [None] * len(completions)
        return [reward(completion_text(c), g, variant, cands)
                for c, g, cands in zip(completions, ground_truth, candidates)]

    fn.__name__ = f"cellpuzzle_{variant}_reward"
    fn.__qualname__ = fn.__name__
    fn.__doc__ = f"CellPuzzles reward, variant {variant!r} (see cellpuzzle_cli.reward)."
    return fn


trl_reward = make_trl_reward(DEFAULT_VARIANT)
