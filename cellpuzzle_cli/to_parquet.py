"""Training puzzles in verl's RL Parquet schema, with a real validation split.

One row per puzzle: `data_source` ("cellpuzzle" by default; our reward accepts any value, while
Cell-o1's own reward returns −1 unless it contains `cell_data`, so users of that reward pass
`--data-source cell_data`), `prompt` (chat
messages from `prompts.record_messages`: a system turn and a user turn — the same turns sft
trains on and predict asks with; Cell-o1 used a user-only RL prompt and a different evaluation
prompt, we use one everywhere), `ability`, `reward_model {style: "rule", ground_truth}` with the
plain gold answer `t1 | t2 | …`, and `extra_info {split, index, puzzle_id, n, group}`, plus
`candidates` (the list the question offers) for open-set puzzles, whose gold answer does not
name every candidate: the reward needs them to refuse an answer outside them. Closed rows are
unchanged, so Cell-o1's reward and files read them as before.

The validation puzzles are held out seeded and group-aware (whole donors where there are
several), instead of reusing the first training rows as Cell-o1's script did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from cellpuzzle_cli.answer import answer_items, format_answer
from cellpuzzle_cli.config import Check, Seed, check_settings, save_settings
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import atomic_output_dir
from cellpuzzle_cli.prompts import record_candidates, record_messages

if TYPE_CHECKING:
    from cellpuzzle_cli.io import Progress
    from cellpuzzle_cli.runner import Job

DATA_SOURCE = "cellpuzzle"
TRAIN_FILE, VAL_FILE = "train.parquet", "val.parquet"
ABILITY = "cell_type_annotation"


@dataclass
class ToParquetSettings:
    """Saved as to-parquet.yaml beside the Parquet files."""

    val_size: Annotated[float, Check(0)] = 0.1  # below 1: a fraction; else a count; 0: none
    seed: Seed = 0
    ability: str = ABILITY
    data_source: str = DATA_SOURCE  # verl routes rewards by it; Cell-o1's reward needs cell_data


@dataclass
class ToParquetResult:
    out: Path
    train: Path
    val: Path
    n_train: int
    n_val: int
    val_groups: list[str]  # groups held out whole; empty when val holds random puzzles


def one_input(positional: Path | None, option: Path | None) -> Path | None:
    """The training file given either way (`to-parquet FILE` or `--data FILE`), not both."""
    if positional is not None and option is not None and Path(positional) != Path(option):
        raise UserError(f"Two training files given ({positional} and --data {option}). Give one, "
                        "either as the argument or with --data.")
    return option if option is not None else positional


def rl_rows(records: Sequence[dict[str, Any]], split: str = "train", start_index: int = 0,
            ability: str = ABILITY, data_source: str = DATA_SOURCE) -> list[dict[str, Any]]:
    """verl-schema rows for split records (`system_msg`, `user_msg`, `assistant_msg`, …)."""
    rows = []
    for i, rec in enumerate(records, start_index):
        items = answer_items(rec.get("assistant_msg"))
        group = rec.get("group")
        n = int(rec.get("n") or len(items))
        info = {"split": split, "index": i, "puzzle_id": str(rec.get("puzzle_id") or f"{split}-{i}"),
                "n": n, "group": None if group is None else str(group)}
        candidates = record_candidates(rec)
        if len(candidates) > n:   # open set: the gold answer alone does not name them
            info["candidates"] = candidates
        rows.append({
            "data_source": data_source,
            "prompt": record_messages(rec),
            "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": format_answer(items)},
            "extra_info": info,
        })
    return rows


def write_parquet(path: Path, rows: list[dict[str, Any]], like: Any = None) -> Any:
    """Write rows as Parquet; an empty file takes the schema of `like` (a pyarrow table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows or like is None else like.schema.empty_table()
    pq.write_table(table, path)
    return table


def to_parquet(data: Path, out: Path, settings: ToParquetSettings, overwrite: bool = False
               ) -> ToParquetResult:
    """Write `train.parquet` and `val.parquet` (and the resolved settings) to `out`."""
    from cellpuzzle_cli.training_data import holdout, read_training_records

    check_settings(settings)
    records = read_training_records(data)
    train, val = holdout(records, settings.val_size, settings.seed)
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        rows = {split: rl_rows(part, split, 0, settings.ability, settings.data_source)
                for split, part in (("train", train), ("val", val))}
        table = write_parquet(tmp / TRAIN_FILE, rows["train"])
        write_parquet(tmp / VAL_FILE, rows["val"], like=table)
        save_settings(tmp, "to-parquet", settings)
    val_groups = {str(r.get("group")) for r in val if r.get("group") is not None}
    train_groups = {str(r.get("group")) for r in train if r.get("group") is not None}
    whole = sorted(val_groups) if val_groups and not val_groups & train_groups else []
    return ToParquetResult(out=out, train=out / TRAIN_FILE, val=out / VAL_FILE,
                           n_train=len(train), n_val=len(val), val_groups=whole)


def step(job: Job, progress: Progress) -> ToParquetResult:
    """to-parquet as a pipeline step (see `runner`)."""
    return to_parquet(job.inputs["train"], job.output, job.settings, overwrite=job.overwrite)
