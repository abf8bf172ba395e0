"""Reading runs: which prediction files form a run, streaming their records, the reference.

A folder is one run and loose files together are another, so `score a/ b/` compares runs side
by side. JSONL is streamed in large blocks (one orjson call per megabyte), because a run can
hold hundreds of thousands of predictions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.io import find_files, read_records
from cellpuzzle_cli.prompts import record_puzzle_id, record_question

SHARD_NAME = "shard-{i}-of-{n}.jsonl"


def file_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a prediction file, streamed for JSONL so big runs need little memory."""
    if path.suffix.lower() == ".jsonl":
        return _iter_jsonl_fast(path)
    return (r for r in read_records(path) if isinstance(r, dict))


def _iter_jsonl_fast(path: Path, chunk_bytes: int = 1 << 20) -> Iterator[Any]:
    """JSONL values, parsed about `chunk_bytes` at a time by one orjson call each.

    JSON strings cannot hold a raw newline, so every newline separates records: turning the
    newlines of a block into commas makes it one JSON array. A block that then does not parse
    to one value per line (blank lines, bad JSON) is re-read line by line to name the bad line.
    """
    import orjson

    lineno = 0
    tail = b""
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk_bytes)
            block = tail + data
            if data:
                cut = block.rfind(b"\n")
                if cut < 0:
                    tail = block
                    continue
                block, tail = block[:cut], block[cut + 1:]
            else:
                tail = b""
            if not block.strip():
                lineno += block.count(b"\n") + (1 if data else 0)
                if not data:
                    return
                continue
            lines = block.count(b"\n") + 1
            try:
                values = orjson.loads(b"[" + block.replace(b"\n", b",") + b"]")
            except orjson.JSONDecodeError:
                values = None
            if values is None or len(values) != lines:
                values = _parse_lines(path, block.split(b"\n"), lineno)
            lineno += lines
            yield from values
            if not data:
                return


def _parse_lines(path: Path, lines: list[bytes], lineno: int) -> list[Any]:
    import orjson

    values = []
    for k, line in enumerate(lines, lineno + 1):
        if not line.strip():
            continue
        try:
            values.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise UserError(f"{path}, line {k} is not valid JSON ({exc}). The file may be "
                            "truncated or not JSONL; regenerate it or fix that line.") from exc
    return values


@dataclass
class RunInput:
    """One run's prediction files; `strict` refuses files without predictions (named by the user)."""

    name: str
    files: list[Path]
    strict: bool = False


def collect_files(inputs: Sequence[Path]) -> list[RunInput]:
    """Group inputs into runs: each folder is one run; files given directly form one run together."""
    runs: list[RunInput] = []
    loose: list[Path] = []
    for raw in inputs:
        p = existing_path(raw, "prediction input")
        if p.is_dir():
            files = [f for f, _ in find_files([p], (".jsonl", ".json"), "prediction folder")]
            if not files:
                raise UserError(f"The folder {p} holds no .jsonl or .json prediction files. Point "
                                "`score` at the output folder of `cellpuzzle predict`.")
            runs.append(RunInput(p.resolve().name or str(p), files))
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



@dataclass
class ManifestShards:
    output_dir: str
    num_shards: int
    files: list[Path]
    missing: list[int]


def shards_from_manifest(manifest: Any) -> ManifestShards:
    """Shard files of the latest `predict` run, and which shards have not completed."""
    latest = manifest.latest("predict")
    if latest is None:
        raise UserError(f"No predictions given and the manifest {manifest.path} records no "
                        "`predict` run. Pass prediction files or folders, or run `cellpuzzle "
                        "predict` first.")
    params = latest.get("params") or {}
    output_dir, num_shards = params.get("output_dir"), params.get("num_shards") or 1
    if output_dir is None:
        raise UserError(f"The latest `predict` entry in {manifest.path} names no output_dir. Pass "
                        "the prediction folder explicitly.")
    found: dict[int, Path] = {}
    names = {SHARD_NAME.format(i=i, n=num_shards): i for i in range(num_shards)}
    for entry in manifest.entries():
        p = entry.get("params") or {}
        if (entry.get("command") != "predict" or not p.get("complete")
                or p.get("output_dir") != output_dir or (p.get("num_shards") or 1) != num_shards):
            continue
        for out in entry.get("outputs", []):
            i = names.get(Path(out["path"]).name)
            if out.get("name") == "predictions" and i is not None:
                path = manifest.resolve(out["path"])
                if path.exists():
                    found[i] = path
    missing = [i for i in range(num_shards) if i not in found]
    return ManifestShards(str(output_dir), int(num_shards), [found[i] for i in sorted(found)], missing)

