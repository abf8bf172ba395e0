"""rl's curriculum over puzzle size (`cellpuzzle.curriculum`, `--curriculum`; see
`cellpuzzle_cli.curriculum` for the plan's syntax).

TRL: GRPO draws the prompts of each generation round through its trainer's sampler; ours is
TRL's own `RepeatSampler` layout (each prompt `num_generations` times, each round's chunk
repeated for its optimisation steps) with the chunk drawn from the current stage's puzzles. A
stage ends after its steps, or once the mean reward of its last W steps reaches its threshold;
the reward of every round is observed as our reward function returns it. The trainer's data
loader fetches one batch ahead, so a reward test sees the rounds up to the one before the round
being drawn: a stage that passes its test ends one round later.

verl 0.9.1 builds its train sampler itself (`create_rl_sampler`: random, or sequential with
`data.shuffle=false`) and has no hook that changes the data while it trains (its
`trainer.v1.sampler.custom_sampler` picks trajectories from the replay buffer, not prompts). A
plan of fixed lengths is therefore written as an ordered training file, stage after stage, that
verl reads sequentially; a killed verl run resumes from its checkpoint with its data loader's
position, so in the right stage. Reward-threshold stages need the TRL backend.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpuzzle_cli.curriculum import (
    Schedule,
    Stage,
    build_schedule,
    check_sizes,
    fixed_lengths,
    parse_plan,
    pools,
)
from cellpuzzle_cli.errors import UserError

if TYPE_CHECKING:
    from cellpuzzle_cli.rl.settings import RLSettings

KEY = "cellpuzzle.curriculum"
TOTAL_KEY = "trainer.total_training_steps"


def row_size(row: dict[str, Any]) -> int:
    """N of a to-parquet row (`extra_info.n`), else of its ground truth (its items; TRL's rows
    carry it as `ground_truth`)."""
    from cellpuzzle_cli.answer import answer_items

    n = (row.get("extra_info") or {}).get("n")
    if n is not None:
        return int(n)
    truth = row.get("ground_truth") or (row.get("reward_model") or {}).get("ground_truth")
    return len(answer_items(truth or ""))


def plan_total(settings: RLSettings, rows: int) -> int:
    """The run's length in steps, as verl counts it: trainer.total_training_steps, else its
    epochs over the data."""
    total = settings.get(TOTAL_KEY)
    if total:
        return int(total)
    batch = int(settings.get("data.train_batch_size", 1))
    return max(1, rows // batch) * int(settings.get("trainer.total_epochs", 1))


# -- TRL ---------------------------------------------------------------------------------------
class StageState:
    """Where a TRL run is in its plan: the sampler draws from it, the reward reports to it."""

    def __init__(self, stages: Sequence[Stage], sizes: Sequence[int], seed: int,
                 steps_per_round: int):
        self.stages, self.sizes, self.spr = tuple(stages), list(sizes), steps_per_round
        self.pools = pools(stages, sizes, seed)
        self.stage = 0
        self.drawn: list[int] = []          # the stage of each round drawn
        self.round_sizes: list[list[int]] = []
        self.rewards: list[float] = []      # the mean reward of each round trained
        self.ended_by: list[str] = []       # why each finished stage ended

    def draw(self, count: int) -> list[int]:
        """The prompts of the next round (advancing first when the stage has had its steps)."""
        stage = self.stages[self.stage]
        done = sum(1 for s in self.drawn if s == self.stage) * self.spr
        if stage.steps and done >= stage.steps and self.stage < len(self.stages) - 1:
            self._advance("steps")
        chosen = self.pools[self.stage].take(count)
        self.drawn.append(self.stage)
        self.round_sizes.append([self.sizes[i] for i in chosen])
        return chosen

    def observe(self, rewards: Sequence[float]) -> None:
        """One round's rewards; the stage ends once its window's mean reaches its threshold."""
        self.rewards.append(sum(rewards) / max(1, len(rewards)))
        stage = self.stages[self.stage]
        if stage.threshold is None or self.stage == len(self.stages) - 1:
            return
        mine = [r for r, s in zip(self.rewards, self.drawn) if s == self.stage]
        window = math.ceil((stage.window or 1) / self.spr)
        if len(mine) >= window and sum(mine[-window:]) / window >= stage.threshold:
            self._advance("reward")

    def _advance(self, why: str) -> None:
        self.ended_by.append(why)
        self.stage += 1

    def stage_of_step(self, step: int) -> int | None:
        index = (step - 1) // self.spr
        return self.drawn[index] if 0 <= index < len(self.rewards) else None

    def step_extras(self, steps: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Per logged step: its stage and sizes, the N mix and mean N of its round's prompts;
        the last logged step of a stage adds the stage's mean reward."""
        out: dict[int, dict[str, Any]] = {}
        staged = [(s, k) for s in sorted(steps) if (k := self.stage_of_step(s)) is not None]
        for i, (step, k) in enumerate(staged):
            mix = Counter(self.round_sizes[(step - 1) // self.spr])
            row = {"stage": k + 1, "stage_sizes": self.stages[k].sizes,
                   "n_mix": {str(n): mix[n] for n in sorted(mix)},
                   "n_mean": sum(n * c for n, c in mix.items()) / max(1, sum(mix.values()))}
            if i == len(staged) - 1 or staged[i + 1][1] != k:
                row["stage_reward"] = self._reward(k)
            out[step] = row
        return out

    def _reward(self, k: int) -> float | None:
        mine = [r for r, s in zip(self.rewards, self.drawn) if s == k]
        return sum(mine) / len(mine) if mine else None

    def summary(self) -> list[dict[str, Any]]:
        """Per stage reached: sizes, steps, rounds, N mix, mean reward and why it ended."""
        trained = self.drawn[:len(self.rewards)]
        out = []
        for k, stage in enumerate(self.stages):
            rounds = [i for i, s in enumerate(trained) if s == k]
            if not rounds:
                continue
            mix = Counter(n for i in rounds for n in self.round_sizes[i])
            out.append({"stage": k + 1, "sizes": stage.sizes,
                        "steps": [rounds[0] * self.spr + 1, (rounds[-1] + 1) * self.spr],
                        "n_mix": {str(n): mix[n] for n in sorted(mix)},
                        "reward": self._reward(k),
                        "ended_by": self.ended_by[k] if k < len(self.ended_by) else "end"})
        return out


def check_trl_plan(stages: Sequence[Stage], total: int, steps_per_round: int) -> None:
    """A TRL plan's lengths against the run: whole rounds, and room for every stage."""
    for stage in stages:
        for what, value in (("steps", stage.steps), ("reward window", stage.window)):
            if value and value % steps_per_round:
                raise UserError(f"'{KEY}': stage {stage} gives {what} {value}, but one round of "
                                f"generations makes {steps_per_round} optimiser steps here "
                                "(data.train_batch_size / ppo_mini_batch_size x ppo_epochs). "
                                f"Use a multiple of {steps_per_round}.")
    if all(s.threshold is None for s in stages):
        fixed_lengths(stages, total, KEY, TOTAL_KEY, "")
        return
    if not stages[-1].rest:
        raise UserError(f"'{KEY}': a plan with reward stages ends with a `rest` stage (e.g. "
                        f"{stages[-1].sizes}:rest): how long the stages before it last is only "
                        "known while training.")
    fixed = sum(s.steps or 0 for s in stages if s.threshold is None and not s.rest)
    if fixed >= total:
        raise UserError(f"'{KEY}': the fixed stages take {fixed} steps, which leaves nothing "
                        f"of {TOTAL_KEY}={total}. Raise it or shorten them.")


def trl_state(settings: RLSettings, rows: Sequence[dict[str, Any]], source: str,
              steps_per_round: int, total: int) -> StageState | None:
    """The TRL run's stage state (None without a plan), checked against its data and length."""
    if settings.ours.curriculum is None:
        return None
    stages = parse_plan(settings.ours.curriculum, KEY)
    sizes = [row_size(r) for r in rows]
    check_sizes(stages, sizes, source, KEY)
    check_trl_plan(stages, total, steps_per_round)
    return StageState(stages, sizes, settings.ours.seed, steps_per_round)


def staged_grpo(base: type, state: StageState, rounds: int) -> type:
    """`base` (TRL's GRPOTrainer) whose train sampler draws each round from the current stage."""
    from torch.utils.data import Sampler

    class _StagedSampler(Sampler):
        def __init__(self, chunk: int, generations: int, repeats: int):
            self.chunk, self.generations, self.repeats = chunk, generations, repeats

        def __len__(self) -> int:
            return rounds * self.chunk * self.generations * self.repeats

        def __iter__(self):
            for _ in range(rounds):
                chosen = state.draw(self.chunk)
                for _ in range(self.repeats):
                    for index in chosen:
                        yield from [index] * self.generations

    class StagedGRPOTrainer(base):
        def _get_train_sampler(self, dataset: Any = None) -> Sampler:
            return _StagedSampler(self.args.generation_batch_size // self.num_generations,
                                  self.num_generations,
                                  self.num_iterations * self.args.steps_per_generation)

    return StagedGRPOTrainer


# -- verl ---------------------------------------------------------------------------------------
@dataclass
class VerlCurriculum:
    schedule: Schedule
    source: Path          # the training file the stages draw from
    staged: Path          # the ordered file verl reads (hidden, beside -o, like sft's checkpoints)
    rows: list[int]       # the rows of `source` the stages draw from

    def summary(self, metrics_log: Path | None = None) -> list[dict[str, Any]]:
        """The stages (sizes, steps, N mix) and, after a run, verl's mean score per stage."""
        from cellpuzzle_cli.curriculum import summary

        scores = _step_scores(metrics_log) if metrics_log else {}
        out = summary(self.schedule, [])
        for stage in out:
            stage.pop("loss")
            first, last = stage["steps"]
            mine = [v for step, v in scores.items() if first <= step <= last]
            stage["reward"] = sum(mine) / len(mine) if mine else None
        return out


def staged_path(output: Path) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.curriculum.parquet"


def plan_verl(settings: RLSettings, output: Path, dry_run: bool,
              notes: list[str]) -> VerlCurriculum | None:
    """verl's stages as one ordered file: checked against the data (sizes, prompt lengths) and
    set into verl's keys (`data.shuffle=false`, the run's length, the ordered file)."""
    from cellpuzzle_cli.rl import settings as S

    if settings.ours.curriculum is None:
        return None
    stages = parse_plan(settings.ours.curriculum, KEY)
    if settings.get("algorithm.filter_groups.enable", False):
        raise UserError(f"{KEY} lays its stages out as batches of data.train_batch_size prompts, "
                        "but algorithm.filter_groups (DAPO) reads extra prompts to replace the "
                        "groups it filters, so the steps would drift across stage boundaries. "
                        "Drop one of the two.")
    source = settings.get(S.TRAIN_KEY)
    if isinstance(source, (list, tuple)):
        source = source[0] if len(source) == 1 else None
    if not source or not Path(str(source)).is_file():
        if dry_run:
            notes.append(f"{KEY} not checked against the data: no local training file.")
            return None
        raise UserError(f"{KEY} reorders one local training Parquet file; {S.TRAIN_KEY} is "
                        f"{settings.get(S.TRAIN_KEY)!r}. Pass --data FILE.")
    rows = _read_rows(Path(str(source)))
    keep = _fitting_rows(settings, Path(str(source)), len(rows), notes)
    sizes = [row_size(rows[i]) for i in keep]
    check_sizes(stages, sizes, str(source), KEY)
    batch = int(settings.get("data.train_batch_size", 1))
    lengths = fixed_lengths(stages, plan_total(settings, len(keep)), KEY, TOTAL_KEY,
                            "verl 0.9.1 reads its training data in one fixed order (no hook "
                            "changes it mid-run; --backend trl can)")
    schedule = build_schedule(stages, lengths, sizes, batch, settings.ours.seed)
    staged = staged_path(output).resolve()
    S.set_key(settings, "data.shuffle", False)
    S.set_key(settings, TOTAL_KEY, schedule.total)
    S.set_key(settings, S.TRAIN_KEY, str(staged))
    notes.append(f"Curriculum: {len(stages)} stage(s) over {schedule.total} steps, read in order "
                 f"from {staged} (written at launch from {source}; data.shuffle=false).")
    return VerlCurriculum(schedule, Path(str(source)), staged, keep)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    wanted = [c for c in ("extra_info", "reward_model") if c in table.column_names]
    return table.select(wanted).to_pylist()


def _fitting_rows(settings: RLSettings, source: Path, count: int, notes: list[str]) -> list[int]:
    """The rows verl keeps: with data.filter_overlong_prompts it drops longer prompts, which
    would shift every later stage, so they are left out of the stages here instead."""
    from cellpuzzle_cli.rl import preflight, verl_backend
    from cellpuzzle_cli.rl import settings as S

    everything = list(range(count))
    model = settings.get(S.MODEL_KEY)
    if not settings.get("data.filter_overlong_prompts", False):
        return everything  # preflight refuses prompts verl would cut
    if preflight.model_problem(model, load=False) or not preflight.is_local(model):
        notes.append(f"{KEY}: prompt lengths not measured (no local model), so prompts verl's "
                     "filter drops would shift the stages.")
        return everything
    cfg = verl_backend.compose_config(S.to_overrides(settings.verl))
    lengths = preflight.prompt_lengths(cfg, str(source), preflight.config_tokenizer(cfg))
    limit = int(settings.get("data.max_prompt_length", 0))
    keep = [i for i, length in enumerate(lengths) if length <= limit]
    if len(keep) < count:
        notes.append(f"{KEY}: {count - len(keep)} prompt(s) longer than "
                     f"data.max_prompt_length={limit} left out of the stages (verl's filter "
                     "would drop them).")
    return keep


def write_staged(vc: VerlCurriculum) -> Path:
    """The ordered file, written atomically (the same bytes again when a run resumes)."""
    import io

    import pyarrow.parquet as pq

    from cellpuzzle_cli.io import atomic_write_bytes

    table = pq.read_table(vc.source).take([vc.rows[i] for i in vc.schedule.order])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(vc.staged, buffer.getvalue())
    return vc.staged


def _step_scores(metrics_log: Path) -> dict[int, float]:
    """verl's mean score per step, from its file logger (`critic/score/mean`)."""
    import json

    from cellpuzzle_cli.rl.preflight import STEP_KEY

    out: dict[int, float] = {}
    try:
        lines = Path(metrics_log).read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        data = record.get("data") or {}
        if STEP_KEY in data and "step" in record:
            out[int(record["step"])] = float(data[STEP_KEY])
    return out
