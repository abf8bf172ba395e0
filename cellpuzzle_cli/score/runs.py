"""Reading runs: which prediction files form a run, streaming their records, the reference.

A folder is one run and loose files together are another, so `score a/ b/` compares runs side
by side. JSONL is streamed in large blocks (one orjson call per megabyte), because a run can
hold hundreds of thousands of predictions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.io import find_files, iter_jsonl, read_records
from cellpuzzle_cli.prompts import record_puzzle_id, record_question


def file_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a prediction file, streamed for JSONL so big runs need little memory."""
    if path.suffix.lower() == ".jsonl":
        return iter_jsonl(path)
    return iter(read_records(path))


@dataclass
class RunInput:
    """One run's prediction files; `strict` refuses files without predictions (named by the user)."""

    name: str
    files: list[Path]
    strict: bool = False
    missing_shards: list[str] = field(default_factory=list)  # scored anyway with --partial
    limit: int | None = None       # predict --limit N made the run
    set_size: int | None = None    # puzzles in the test set predict read (None: not recorded)


def with_predict_facts(run: RunInput, folder: Path) -> RunInput:
    """The run as predict recorded it in its folder: the test set's size and any --limit, so
    a run that answers only some of the set is reported as partial."""
    import orjson

    from cellpuzzle_cli.predict.shard_run import RUN_FILE

    try:
        facts = orjson.loads((Path(folder) / RUN_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return run
    if isinstance(facts, dict):
        whole = [v if isinstance(v, int) and not isinstance(v, bool) else None
                 for v in (facts.get("limit"), facts.get("puzzles_in_set"))]
        run.limit, run.set_size = whole
    return run


def collect_files(inputs: Sequence[Path], partial: bool = False) -> list[RunInput]:
    """Group inputs into runs: each folder is one run; files given directly form one run together.

    A folder of predict's shard files that lacks some of its run's shards is refused (half the
    puzzles would be scored as if they were all), unless `partial`; the run then says so."""
    from cellpuzzle_cli.predict.shards import missing_shards

    runs: list[RunInput] = []
    loose: list[Path] = []
    for raw in inputs:
        p = existing_path(raw, "prediction input")
        if p.is_dir():
            files = [f for f, _ in find_files([p], (".jsonl", ".json"), "prediction folder")]
            if not files:
                raise UserError(f"The folder {p} holds no .jsonl or .json prediction files. Point "
                                "`score` at the output folder of `cellpuzzle predict`.")
            missing = missing_shards(files)
            if missing and not partial:
                raise UserError(f"The folder {p} holds an incomplete predict run: "
                                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                "missing, so only some of its puzzles would be scored. Run the "
                                "missing shard(s) (`cellpuzzle predict --shard i/n`), or pass "
                                "--partial to score the finished ones (the report says so).")
            runs.append(with_predict_facts(
                RunInput(p.resolve().name or str(p), files, missing_shards=missing), p))
        else:
            loose.append(p.resolve())
    if loose:
        name = loose[0].stem if len(loose) == 1 else loose[0].parent.name
        runs.insert(0, RunInput(name, loose, strict=True))
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"
    return runs


def load_reference(path: Path) -> dict[str, dict[str, Any]]:
    """The reference's records by puzzle id; files without ids (Cell-o1's JSON, the published
    Parquet) get the ids predict derives from the prompt text, so the two always agree."""
    ref = {}
    for r in read_records(path):
        if isinstance(r, dict) and (r.get("puzzle_id") is not None or record_question(r)):
            ref[record_puzzle_id(r)] = r
    if not ref:
        raise UserError(f"The reference {path} holds no puzzles (records with a `puzzle_id` or "
                        "a `user_msg`/`question`). Pass the test file you gave predict: a "
                        "split's test.jsonl, Cell-o1's test_data.json or a CellPuzzles Parquet.")
    return ref
