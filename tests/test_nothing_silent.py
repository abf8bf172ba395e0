"""Partial or stale work is never presented as whole; faults leave nothing behind (issue 22).

Each test goes through the real CLI with one of the issue's examples: an input changed since
the manifest recorded it, a manifest that cannot be written, a folder holding 1 of 2 shards, a
learning rate of inf, a loss that turns NaN, answers nothing can read, bad seeds, SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from fixtures import (
    assert_user_error,
    make_records,
    message_text,
    prediction_lines,
    tiny_model_dir,
    write_records,
)

from cellpuzzle_cli.synthetic import SyntheticSpec, write_synthetic_h5ad

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("atlas")
    return write_synthetic_h5ad(root / "atlas.h5ad", SyntheticSpec(n_cells=300, n_cell_types=5))


def _chain(cli, tmp_path: Path, atlas: Path) -> None:
    for args in (("build-context", atlas, "-o", tmp_path / "cells"),
                 ("make-qa", "-o", tmp_path / "puzzles", "--max-n", "4")):
        result = cli(*args)
        assert result.code == 0, result.output


# -- the ledger checks what it hands out -------------------------------------------------------
def test_an_output_edited_since_it_was_recorded_is_refused_until_allowed(cli, tmp_path, atlas):
    _chain(cli, tmp_path, atlas)
    puzzles = tmp_path / "puzzles" / "puzzles.jsonl"
    lines = puzzles.read_text().splitlines()
    puzzles.write_text("\n".join(lines[:-1]) + "\n")       # a puzzle lost behind the ledger's back
    result = cli("split", "-o", tmp_path / "splits")
    assert_user_error(result, "puzzles changed since the manifest recorded it", "make-qa",
                      "--allow-changed")
    assert not (tmp_path / "splits").exists()
    allowed = cli("--allow-changed", "split", "-o", tmp_path / "splits")
    assert allowed.code == 0, allowed.output
    assert "used as it is (--allow-changed)" in message_text(allowed)
    # the new hash is on record now: the next run takes it without the flag
    assert cli("split", "-o", tmp_path / "splits2").code == 0


def test_a_recorded_hash_that_no_longer_matches_is_refused(cli, tmp_path, atlas):
    _chain(cli, tmp_path, atlas)
    document = orjson.loads(cli.manifest.read_bytes())
    document["entries"][-1]["outputs"][0]["sha256"] = "0" * 64   # the ledger tampered with
    cli.manifest.write_bytes(orjson.dumps(document))
    assert_user_error(cli("split", "-o", tmp_path / "splits"), "changed since the manifest")


def test_an_unwritable_manifest_is_found_before_any_work(tmp_path, atlas):
    from fixtures import run_cli

    unwritable = Path("/sys/cellpuzzle-test/cellpuzzle.json")   # a read-only file system
    result = run_cli("build-context", atlas, "-o", tmp_path / "cells", manifest=unwritable)
    assert_user_error(result, "cannot be written", "nothing was done")
    assert not (tmp_path / "cells").exists()


# -- partial runs say so -----------------------------------------------------------------------
def test_score_refuses_a_folder_with_one_of_two_shards_unless_partial(cli, tmp_path):
    records = make_records(12)
    test = write_records(tmp_path / "test.jsonl", records)
    train = write_records(tmp_path / "train.jsonl", make_records(40, seed=1))
    result = cli("predict", "--backend", "baseline", "--data", test, "--train", train,
                 "--shard", "0/2", "-o", tmp_path / "preds")
    assert result.code == 0, result.output
    assert_user_error(cli("score", tmp_path / "preds"), "shard-1-of-2.jsonl", "is missing",
                      "--partial")
    partial = cli("score", tmp_path / "preds", "--partial", "--json", tmp_path / "s.json")
    assert partial.code == 0, partial.output
    assert "is partial" in message_text(partial)
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["partial"] == {"missing_shards": ["shard-1-of-2.jsonl"]}
    assert report["count"] < len(records)


def test_answers_nothing_can_read_are_called_out_with_an_example(cli, tmp_path):
    records = make_records(6)
    lines = prediction_lines(records, ["\n\n\n"] * 5 + [None])
    preds = write_records(tmp_path / "preds" / "shard-0-of-1.jsonl", lines)
    result = cli("score", preds.parent)
    assert result.code == 0, result.output
    text = message_text(result)
    assert "5 of 5 answers are not in the answer format" in text
    assert "'\\n\\n\\n'" in text and "not a measure of what it knows" in text


# -- training that would publish garbage --------------------------------------------------------
def test_an_infinite_learning_rate_is_refused_before_training(cli, tmp_path):
    train = write_records(tmp_path / "train.jsonl", make_records(8))
    result = cli("sft", "--model", tmp_path / "none", "--data", train, "-o", tmp_path / "a",
                 "learning_rate=inf")
    assert_user_error(result, "'learning_rate' must be a finite number", "inf")


def test_a_loss_that_turns_nan_stops_sft_and_publishes_nothing(cli, tmp_path):
    records = make_records(16)
    train = write_records(tmp_path / "train.jsonl", records)
    model = tiny_model_dir(tmp_path / "model", records)
    result = cli("sft", "--model", model, "--data", train, "-o", tmp_path / "adapter",
                 "finetune=full", "max_steps=4", "learning_rate=1e38", "max_grad_norm=1e38",
                 "logging_steps=1", "eval_size=0", "gradient_accumulation_steps=1",
                 "warmup_steps=0", "lr_scheduler_type=constant")
    assert_user_error(result, "became nan", "nothing was written")
    assert not (tmp_path / "adapter").exists()
    assert not any(p.name.startswith(".adapter") for p in tmp_path.iterdir())


def test_training_answers_outside_the_candidates_are_refused(cli, tmp_path):
    records = make_records(6)
    records[2] = {**records[2], "assistant_msg": records[2]["assistant_msg"].replace(
        records[2]["assistant_msg"].split(" | ")[0], "neutrophil", 1)}
    train = write_records(tmp_path / "train.jsonl", records)
    result = cli("to-parquet", train, "-o", tmp_path / "rl")
    assert_user_error(result, records[2]["puzzle_id"])
    assert not (tmp_path / "rl").exists()


# -- faults --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_out_of_range_seeds_are_a_clear_error(cli, tmp_path, seed):
    preds = write_records(tmp_path / "p.jsonl", prediction_lines(make_records(3), [None] * 3))
    assert_user_error(cli("score", preds, "--seed", seed), "'seed' must be between 0 and")


def test_sigterm_removes_the_half_written_output(tmp_path):
    big = write_synthetic_h5ad(tmp_path / "big.h5ad", SyntheticSpec(n_cells=60_000, n_genes=2000,
                                                                    nnz_per_cell=400))
    out = tmp_path / "cells"
    env = {**os.environ, "CELLPUZZLE_MANIFEST": str(tmp_path / "m.json")}
    proc = subprocess.Popen([sys.executable, "-m", "cellpuzzle_cli", "build-context", str(big),
                             "-o", str(out), "--workers", "1", "--top-genes", "50"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".cells.*.partial")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("build-context ended before the test could interrupt it")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert not list(tmp_path.glob(".cells.*")) and not out.exists()
