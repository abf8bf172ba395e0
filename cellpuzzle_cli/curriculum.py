"""A curriculum over puzzle size: small puzzles first, larger ones as training goes on.

A plan is a comma-separated list of stages, `SIZES:LENGTH`, run in order:

    3-5:400                 400 steps on puzzles of 3 to 5 cells
    3:500                   one size
    3-15:rest               the steps that remain (the last stage only)
    3-5:reward>=0.6/20      rl, TRL backend: until the mean reward of the last 20 steps is 0.6
    3-5:400|reward>=0.6/20  whichever comes first

A stage trains on the puzzles whose N lies in its range, in the proportions the data holds them,
drawn in seeded passes without replacement (a stage longer than its pool goes round it again).
A plan of fixed lengths is an *ordered* dataset: stage 1's examples, then stage 2's, ... read in
order by the trainer's own sequential sampler (transformers' `train_sampling_strategy=sequential`
for sft, `data.shuffle=false` for verl). A resumed run then continues at the very batch it
stopped at, in its stage, because the trainer skips the batches it already saw.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpuzzle_cli.errors import UserError

if TYPE_CHECKING:
    from cellpuzzle_cli.sft import SftSettings

REWARD_RANGE = (-1.0, 1.0)  # the CellPuzzles reward (cellpuzzle_cli.reward)
SYNTAX = ("stages `SIZES:LENGTH` joined by commas, e.g. 3-5:400,3-8:400,3-15:rest (SIZES: N or "
          "N-M; LENGTH: steps, `rest`, reward>=X/W, or STEPS|reward>=X/W)")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_REWARD = re.compile(r"^reward>=(-?[\d.]+(?:e-?\d+)?)/(\d+)$")


@dataclass(frozen=True)
class Stage:
    """One stage: puzzle sizes `low..high`, and when it ends (steps, rest, a reward test)."""

    low: int
    high: int
    steps: int | None = None
    rest: bool = False
    threshold: float | None = None
    window: int | None = None

    @property
    def sizes(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    def holds(self, n: int) -> bool:
        return self.low <= n <= self.high

    def __str__(self) -> str:
        ends = ["rest"] if self.rest else ([str(self.steps)] if self.steps else [])
        if self.threshold is not None:
            ends.append(f"reward>={self.threshold:g}/{self.window}")
        return f"{self.sizes}:{'|'.join(ends)}"


def parse_plan(text: Any, key: str = "curriculum") -> tuple[Stage, ...]:
    """The stages of a plan, or a UserError naming the stage and what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        hint = " (YAML reads an unquoted 3:50 as a number: quote the plan)" \
            if isinstance(text, (int, float)) else ""
        raise UserError(f"'{key}' must be {SYNTAX}; got {text!r}{hint}.")
    stages = tuple(_stage(part.strip(), key) for part in text.split(","))
    for stage in stages[:-1]:
        if stage.rest:
            raise UserError(f"'{key}': only the last stage can be `rest` (the steps that "
                            f"remain), got {text!r}.")
    return stages


def _stage(part: str, key: str) -> Stage:
    sizes, sep, length = part.partition(":")
    found = _RANGE.match(sizes.strip())
    if not sep or not found:
        hint = " (YAML reads an unquoted 3:50 as the number 230: quote the plan)" \
            if part.isdigit() else ""
        raise UserError(f"'{key}': stage {part!r} is not SIZES:LENGTH; write {SYNTAX}{hint}.")
    low = int(found.group(1))
    high = int(found.group(2) or low)
    if low > high:
        raise UserError(f"'{key}': stage {part!r} runs from N {low} down to {high}; write the "
                        f"smaller size first ({high}-{low}).")
    if low < 1:
        raise UserError(f"'{key}': stage {part!r} asks for puzzles of {low} cells; N is 1 or more.")
    steps, rest, threshold, window = None, False, None, None
    for term in (t.strip() for t in length.split("|")):
        if term == "rest" and not rest and steps is None:
            rest = True
        elif term.isdigit() and steps is None and not rest:
            steps = int(term)
            if steps == 0:
                raise UserError(f"'{key}': stage {part!r} has 0 steps; give each stage at least "
                                "1 step, or leave the stage out.")
        elif (m := _REWARD.match(term)) and threshold is None:
            threshold, window = _threshold(m.group(1), part, key), int(m.group(2))
            if window < 1:
                raise UserError(f"'{key}': stage {part!r} averages the reward over {window} "
                                "steps; the window is 1 step or more.")
        else:
            raise UserError(f"'{key}': stage {part!r} has the length {term!r}; write {SYNTAX}.")
    return Stage(low, high, steps, rest, threshold, window)


def _threshold(text: str, part: str, key: str) -> float:
    low, high = REWARD_RANGE
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # also refuses nan
        raise UserError(f"'{key}': stage {part!r} waits for a mean reward of {text}, which the "
                        f"reward never gives: it lies between {low:g} (an illegitimate answer) "
                        f"and {high:g} (every cell right). Choose a threshold in that range.")
    return value


def fixed_lengths(stages: Sequence[Stage], total: int | None, key: str, total_key: str,
                  why_fixed: str) -> list[int]:
    """Steps per stage for a trainer that reads an ordered dataset (no reward tests); `rest`
    takes what `total` leaves. `total` None: the stages' sum is the run's length."""
    dynamic = [s for s in stages if s.threshold is not None]
    if dynamic:
        raise UserError(f"'{key}': stage {dynamic[0]} advances on the reward, but {why_fixed}. "
                        "Give every stage a number of steps (e.g. 3-5:400).")
    fixed = sum(s.steps or 0 for s in stages)
    if stages[-1].rest:
        if total is None:
            raise UserError(f"'{key}': `rest` is the steps left of {total_key}, which is not set. "
                            f"Set {total_key}, or give the last stage its steps.")
        if total - fixed < 1:
            raise UserError(f"'{key}': the stages before `rest` take {fixed} steps, which leaves "
                            f"nothing of {total_key}={total}. Raise {total_key} or shorten them.")
        return [s.steps or total - fixed for s in stages]
    if total is not None and fixed != total:
        raise UserError(f"'{key}': the stages add up to {fixed} steps but {total_key} is {total}. "
                        f"End the plan with a `rest` stage (e.g. {stages[-1].sizes}:rest), or set "
                        f"{total_key}={fixed}.")
    return [int(s.steps or 0) for s in stages]


def check_sizes(stages: Sequence[Stage], sizes: Sequence[int], source: str, key: str) -> None:
    """Every stage must find puzzles in the data (checked before any training)."""
    present = sorted(set(sizes))
    for i, stage in enumerate(stages, 1):
        if not any(stage.holds(n) for n in present):
            raise UserError(f"'{key}': stage {i} ({stage}) wants puzzles of N {stage.sizes}, but "
                            f"{source} has none: its puzzles have N "
                            f"{', '.join(map(str, present))}. Change the stage's sizes, or make "
                            "puzzles of that size (make-qa --min-n/--max-n).")


class Pool:
    """A stage's puzzles, handed out in seeded passes without replacement."""

    def __init__(self, indices: Sequence[int], seed: int, stage: int):
        self.indices, self.queue = list(indices), []
        self.rng = random.Random(f"curriculum:{seed}:{stage}")

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if not self.queue:
                self.queue = list(self.indices)
                self.rng.shuffle(self.queue)
            out.append(self.queue.pop())
        return out


def pools(stages: Sequence[Stage], sizes: Sequence[int], seed: int) -> list[Pool]:
    return [Pool([i for i, n in enumerate(sizes) if stage.holds(n)], seed, k)
            for k, stage in enumerate(stages)]


@dataclass
class Schedule:
    """A plan of fixed lengths laid out as one ordered dataset: `order[j]` is the example the
    trainer reads j-th; `per_step` examples make one optimiser step (all processes together)."""

    stages: tuple[Stage, ...]
    lengths: list[int]
    per_step: int
    order: list[int]
    sizes: list[int]              # N of each example in `order`
    ends: list[int] = field(init=False)  # the last step of each stage

    def __post_init__(self) -> None:
        total, self.ends = 0, []
        for length in self.lengths:
            total += length
            self.ends.append(total)

    @property
    def total(self) -> int:
        return self.ends[-1]

    def stage_at(self, step: int) -> int:
        """The stage (0-based) that optimiser step `step` (1-based) trains in."""
        return next((k for k, end in enumerate(self.ends) if step <= end), len(self.ends) - 1)

    def mix(self, first: int, last: int) -> Counter:
        """N of the puzzles trained in steps first..last (1-based, inclusive)."""
        return Counter(self.sizes[(first - 1) * self.per_step:last * self.per_step])


def build_schedule(stages: Sequence[Stage], lengths: Sequence[int], sizes: Sequence[int],
                   per_step: int, seed: int) -> Schedule:
    """The ordered dataset of a plan: each stage's steps x `per_step` examples from its pool."""
    order: list[int] = []
    for pool, length in zip(pools(stages, sizes, seed), lengths):
        order += pool.take(length * per_step)
    return Schedule(tuple(stages), list(lengths), per_step, order, [sizes[i] for i in order])


def sft_schedule(records: Sequence[dict[str, Any]], settings: SftSettings, data: Path,
                 processes: int) -> Schedule | None:
    """sft's curriculum as an ordered dataset of its training part (the records `holdout`
    keeps), or None without one. A stage whose sizes no puzzle has is refused here, before any
    training; N comes from a record's `n`, else from its question."""
    lengths = settings.stage_lengths()
    if lengths is None:
        return None
    from cellpuzzle_cli.predict.records import puzzle_size
    from cellpuzzle_cli.training_data import holdout

    stages = parse_plan(settings.curriculum)
    train = holdout(records, settings.eval_size, settings.seed)[0]
    sizes = [puzzle_size(r) or 0 for r in train]
    check_sizes(stages, sizes, str(data), "curriculum")
    per_step = settings.per_device_train_batch_size * settings.gradient_accumulation_steps
    return build_schedule(stages, lengths, sizes, per_step * processes, settings.seed)


def _mix_json(mix: Counter) -> dict[str, int]:
    return {str(n): mix[n] for n in sorted(mix)}


def step_extras(schedule: Schedule, history: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per logged step (for metrics.jsonl): its stage, its sizes, the N mix of the puzzles
    trained since the previous logged step and their mean N; a stage's last row adds the
    stage's mean training loss."""
    logged = sorted({int(e["step"]) for e in history if "loss" in e})
    losses = stage_losses(schedule, history)
    out: dict[int, dict[str, Any]] = {}
    previous = 0
    for step in logged:
        k = schedule.stage_at(step)
        mix = schedule.mix(previous + 1, step)
        row = {"stage": k + 1, "stage_sizes": schedule.stages[k].sizes, "n_mix": _mix_json(mix),
               "n_mean": sum(n * c for n, c in mix.items()) / max(1, sum(mix.values()))}
        if step == schedule.ends[k] and losses[k] is not None:
            row["stage_loss"] = losses[k]
        out[step] = row
        previous = step
    return out


def stage_losses(schedule: Schedule, history: Sequence[dict[str, Any]]) -> list[float | None]:
    """Mean training loss per stage: each logged loss weighted by the steps it averages."""
    sums = [0.0] * len(schedule.lengths)
    weights = [0] * len(schedule.lengths)
    previous = 0
    for entry in sorted((e for e in history if "loss" in e), key=lambda e: e["step"]):
        step = int(entry["step"])
        k = schedule.stage_at(step)
        sums[k] += float(entry["loss"]) * (step - previous)
        weights[k] += step - previous
        previous = step
    return [s / w if w else None for s, w in zip(sums, weights)]


def summary(schedule: Schedule, history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages as the manifest keeps them: sizes, steps, N mix and mean loss."""
    losses = stage_losses(schedule, history)
    out, first = [], 1
    for k, (stage, end) in enumerate(zip(schedule.stages, schedule.ends)):
        out.append({"stage": k + 1, "sizes": stage.sizes, "steps": [first, end],
                    "n_mix": _mix_json(schedule.mix(first, end)), "loss": losses[k]})
        first = end + 1
    return out


def boundary_logger(ends: Sequence[int]) -> Any:
    """A TrainerCallback that logs at the last step of every stage, so no logged loss mixes
    two stages and each stage's loss can be read off the log."""
    from transformers import TrainerCallback

    class _Boundaries(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in ends:
                control.should_log = True
            return control

    return _Boundaries()
