"""A quick look before the long run: `predict --limit N`, recorded and scored as partial."""

from __future__ import annotations

import time

import orjson
import pytest
from fixtures import assert_says, make_records, tiny_model_dir, write_records

from cellpuzzle_cli.io import iter_jsonl
from cellpuzzle_cli.manifest import Artifact, Manifest
from cellpuzzle_cli.predict.shards import order_key

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def split(cli, tmp_path):
    """A recorded split of 12 test puzzles (and training puzzles for the baseline)."""
    test = write_records(tmp_path / "test.jsonl", make_records(12))
    train = write_records(tmp_path / "train.jsonl", make_records(30, seed=9))
    Manifest(cli.manifest).record("split", {}, [], [Artifact(train, "train"),
                                                    Artifact(test, "test")], time.time())
    return test


def _ids(folder) -> list[str]:
    return [r["puzzle_id"] for r in iter_jsonl(folder / "shard-0-of-1.jsonl")]


def test_limit_predicts_exactly_the_first_n_and_score_says_partial(cli, split, tmp_path):
    out = tmp_path / "quick"
    result = cli("predict", "--backend", "baseline", "--limit", "5", "-o", out)
    assert result.code == 0, result.output
    every = sorted((r["puzzle_id"] for r in iter_jsonl(split)), key=order_key)
    assert _ids(out) == every[:5]                    # exactly 5: the first in the fixed order
    assert_says(result, "Partial run (--limit 5)", "answer 5 of 12 puzzles")
    entry = Manifest(cli.manifest).entries()[-1]
    assert entry.command == "predict"
    assert (entry.params["limit"], entry.params["partial"], entry.params["answered"]) == (5, True, 5)

    scored = cli("score", out, "--json", tmp_path / "s.json")
    assert scored.code == 0, scored.output
    assert_says(scored, "Run 'quick' is partial: it answers 5 of the 12 puzzles",
                "(predict --limit 5)", "5 of 12 (partial)")
    report = orjson.loads((tmp_path / "s.json").read_bytes())
    assert report["partial"] == {"answered": 5, "of": 12, "limit": 5}
    from_ledger = cli("score")                       # the latest predict run, from the manifest
    assert_says(from_ledger, "is partial", "5 of the 12 puzzles")


def test_a_run_without_limit_completes_a_limited_one(cli, split, tmp_path):
    out = tmp_path / "quick"
    assert cli("predict", "--backend", "baseline", "--limit", "5", "-o", out).code == 0
    first = {r["puzzle_id"]: r for r in iter_jsonl(out / "shard-0-of-1.jsonl")}
    result = cli("predict", "--backend", "baseline", "-o", out, "--format", "json")
    assert result.code == 0, result.output
    shard = orjson.loads(result.stdout)["summary"]["shards"][0]
    assert (shard["puzzles"], shard["resumed"], shard["new"], shard["partial"]) == (12, 5, 7, False)
    rows = {r["puzzle_id"]: r for r in iter_jsonl(out / "shard-0-of-1.jsonl")}
    assert len(rows) == 12 and all(rows[k] == v for k, v in first.items())
    scored = cli("score", out, "--json", tmp_path / "s.json")
    assert "partial" not in scored.output
    assert "partial" not in orjson.loads((tmp_path / "s.json").read_bytes())


def test_limit_must_be_positive(cli, split, tmp_path):
    result = cli("predict", "--backend", "baseline", "--limit", "0", "-o", tmp_path / "q")
    assert result.code == 2 and "--limit" in result.output
    assert not (tmp_path / "q").exists()


def test_a_quick_look_with_a_model_shows_one_progress_display(cli, split, tmp_path):
    """transformers' own bars (loading the weights) stay off the terminal: ours is the one."""
    model = tiny_model_dir(tmp_path / "model", make_records(20))
    result = cli("predict", "--backend", "hf", "--model", model, "--limit", "2",
                 "--max-new-tokens", "4", "-o", tmp_path / "q")
    assert result.code == 0, result.output
    assert len(_ids(tmp_path / "q")) == 2
    for bar in ("it/s]", "%|", "Loading weights"):
        assert bar not in result.output, result.output
