"""`cellpuzzle score`: the numbers, the inputs it accepts, the outputs it writes, its refusals."""

from __future__ import annotations

import math
import time
from pathlib import Path

import orjson
import pytest
from fixtures import (
    answered,
    assert_user_error,
    gold_records,
    make_records,
    prediction_lines,
    write_records,
)

from cellpuzzle_cli.manifest import Artifact, Manifest

GOLD = "B cells | NK cells | T cells"


def three_cell_records(prefix: str = "p", count: int = 4) -> list[dict]:
    """Test puzzles of three cells each, as split writes them; ids `{prefix}-000`, …"""
    return make_records(count, n_cells=(3, 3), id_prefix=prefix)


def swapped(gold: str) -> str:
    """A legitimate answer with the first two cells' types exchanged: 1 of 3 cells right."""
    first, second, *rest = gold.split(" | ")
    return answered(" | ".join([second, first, *rest]))


def four_predictions(prefix: str = "p") -> list[dict]:
    """predict's lines for three_cell_records(prefix): correct, swapped, no tags, failed."""
    records = three_cell_records(prefix)
    golds = [r["assistant_msg"] for r in records]
    return prediction_lines(records, [answered(golds[0]), swapped(golds[1]), golds[2], None])


def load(path: Path) -> dict:
    return orjson.loads(path.read_bytes())


def test_metrics_and_json_keys(cli, tmp_path):
    preds = write_records(tmp_path / "preds.jsonl", four_predictions())
    result = cli("score", preds, "--json", tmp_path / "r.json")
    assert result.code == 0, result.output
    assert "Cell accuracy" in result.output and "whitespace words" in result.output
    r = load(tmp_path / "r.json")
    assert r["cell_accuracy"] == pytest.approx(4 / 12)
    assert r["exact_match"] == pytest.approx(1 / 4)
    assert r["format_legitimacy"] == pytest.approx(2 / 4)
    assert r["uniqueness"] == pytest.approx(2 / 4)
    assert r["count"] == 4 and r["errors"] == 1
    assert set(r["by_n"]) == {"3"} and r["by_n"]["3"]["count"] == 4
    # every puzzle has N=3, so that row holds the same numbers, computed over its own puzzles
    assert r["by_n"]["3"]["cell_accuracy"] == pytest.approx(4 / 12)
    assert r["by_n"]["3"]["exact_match"] == pytest.approx(1 / 4)
    assert r["prediction_length_unit"] == "whitespace words"
    # ± as Cell-o1 prints it: binomial for exact/format, sample std for cell accuracy.
    assert r["exact_match_pm"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    partial = [1, 1 / 3, 0, 0]
    mean = sum(partial) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in partial) / 3)
    assert r["cell_accuracy_pm"] == pytest.approx(std)
    assert r["cell_accuracy_se"] == pytest.approx(std / 2)
    lo, hi = r["exact_match_ci95"]
    assert 0 <= lo <= r["exact_match"] <= hi <= 1
    # The run is recorded, with the report as its output.
    entry = Manifest(cli.manifest).latest("score")
    assert [o.name for o in entry.outputs] == ["report"]


def test_same_seed_same_report(cli, tmp_path):
    records = make_records(40, n_cells=(3, 6))  # sizes and scores varied enough to resample
    texts = [answered(r["assistant_msg"]) if i % 3 else swapped(r["assistant_msg"])
             for i, r in enumerate(records)]
    preds = write_records(tmp_path / "preds.jsonl", prediction_lines(records, texts))
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        result = cli("score", preds, "--json", tmp_path / f"{name}.json", "--seed", seed)
        assert result.code == 0, result.output
    a, b, c = (load(tmp_path / f"{name}.json") for name in "abc")
    assert a == b
    # The interval is a real bootstrap (another seed moves it), so the equality above is earned.
    assert a["cell_accuracy_ci95"] != c["cell_accuracy_ci95"]


def test_cello1_compat_counts_extra_items_as_exact(cli, tmp_path):
    record = three_cell_records(count=1)[0]
    extra = answered(record["assistant_msg"] + " | Monocytes")
    preds = write_records(tmp_path / "p.jsonl", prediction_lines([record], [extra]))
    cli("score", preds, "--json", tmp_path / "a.json", "--bootstrap", "0")
    cli("score", preds, "--json", tmp_path / "b.json", "--cello1-compat")
    assert load(tmp_path / "a.json")["exact_match"] == 0.0
    assert load(tmp_path / "b.json")["exact_match"] == 1.0


def test_folders_of_shards_and_several_runs_with_plot(cli, tmp_path):
    run_a, run_b = tmp_path / "runA", tmp_path / "runB"
    recs = four_predictions()
    write_records(run_a / "shard-0-of-2.jsonl", recs[:2])
    write_records(run_a / "shard-1-of-2.jsonl", recs[2:])
    (run_a / "predict.json").write_bytes(orjson.dumps({"backend": "hf"}))  # config: skipped
    records = three_cell_records()
    write_records(run_b / "shard-0-of-1.jsonl",
                  prediction_lines(records, [answered(r["assistant_msg"]) for r in records]))
    result = cli("score", run_a, run_b, "--json", tmp_path / "r.json", "--plot", tmp_path / "p.png")
    assert result.code == 0, result.output
    assert "runA" in result.output and "runB" in result.output
    r = load(tmp_path / "r.json")
    assert set(r) == {"runA", "runB"}
    assert r["runA"]["overall"]["count"] == 4 and r["runA"]["cell_accuracy"] == pytest.approx(4 / 12)
    assert r["runB"]["exact_match"] == 1.0 and r["runB"]["by_n"]["3"]["exact_match"] == 1.0
    png = (tmp_path / "p.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_cello1_per_example_json_folder_and_json_arrays(cli, tmp_path):
    folder = tmp_path / "cello1"
    folder.mkdir()
    # Cell-o1's inference writes one JSON object per example, gold in `answer` or `assistant_msg`.
    # (Written by hand: this is Cell-o1's format, not ours.)
    (folder / "0.json").write_bytes(orjson.dumps({"answer": GOLD, "prediction": answered(GOLD)}))
    (folder / "1.json").write_bytes(orjson.dumps({"assistant_msg": GOLD,
                                                  "prediction": swapped(GOLD)}))
    (folder / "2.json").write_bytes(orjson.dumps([{"answer": GOLD,
                                                   "prediction": answered(GOLD)}]))
    result = cli("score", folder, "--json", tmp_path / "r.json")
    assert result.code == 0, result.output
    r = load(tmp_path / "r.json")
    assert r["count"] == 3 and r["exact_match"] == pytest.approx(2 / 3)


def test_duplicate_puzzle_names_both_files(cli, tmp_path):
    lines = four_predictions()
    deep = tmp_path / ("a-folder-name-longer-than-a-line-" * 3)  # the panel folds the paths
    a = write_records(deep / "a.jsonl", lines[:2])
    b = write_records(deep / "b.jsonl", lines[1:3])
    assert_user_error(cli("score", a, b), lines[1]["puzzle_id"], str(a), str(b))


def test_reference_reports_missing_puzzles(cli, tmp_path):
    test = three_cell_records(count=5)
    preds = write_records(tmp_path / "p.jsonl", four_predictions()[:3])
    ref = write_records(tmp_path / "test.jsonl", test)
    result = cli("score", preds, "--reference", ref, "--json", tmp_path / "r.json")
    assert result.code == 0, result.output
    missing = [r["puzzle_id"] for r in test[3:]]
    assert all(pid in result.output for pid in missing)
    r = load(tmp_path / "r.json")
    assert r["missing"] == missing and r["missing_count"] == 2


def test_gold_taken_from_reference_when_predictions_lack_it(cli, tmp_path):
    record = three_cell_records(count=1)[0]
    unlabelled = {k: v for k, v in record.items() if k != "assistant_msg"}  # predict's input
    lines = prediction_lines([unlabelled], [answered(record["assistant_msg"])])
    preds = write_records(tmp_path / "p.jsonl", lines)
    assert_user_error(cli("score", preds), "gold answer", "--reference")
    ref = write_records(tmp_path / "test.jsonl", [record])
    result = cli("score", preds, "--reference", ref, "--json", tmp_path / "r.json")
    assert result.code == 0, result.output
    assert load(tmp_path / "r.json")["exact_match"] == 1.0


def test_bad_inputs_are_user_errors(cli, tmp_path):
    assert_user_error(cli("score", tmp_path / "nope.jsonl"), "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "x", "answer": "a | b"}\n{not json\n')
    assert_user_error(cli("score", bad), "line 2")
    split = write_records(tmp_path / "split.jsonl", three_cell_records(count=2))
    assert_user_error(cli("score", split), "prediction")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("5\n6\n")
    assert_user_error(cli("score", numbers), "holds no predictions")


def test_tokenizer_lengths(cli, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<": 1, ">": 2, "/": 3, "think": 4, "answer": 5, "|": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    preds = write_records(tmp_path / "p.jsonl", prediction_lines(gold_records([GOLD]),
                                                                 ["<think>x</think>"]))
    result = cli("score", preds, "--tokenizer", tmp_path / "tok", "--json", tmp_path / "r.json")
    assert result.code == 0, result.output
    r = load(tmp_path / "r.json")
    assert r["prediction_length_unit"].startswith("tokens")
    assert r["prediction_length"] == 7  # "<" "think" ">" "x" "</" "think" ">", 1 whitespace word


# -- no argument: the latest predict run from the manifest ---------------------------------
def record_shard(manifest: Path, out_dir: Path, i: int, n: int, complete: bool = True) -> Path:
    shard = write_records(out_dir / f"shard-{i}-of-{n}.jsonl", four_predictions(prefix=f"s{i}"))
    Manifest(manifest).record("predict", {"output_dir": str(out_dir), "num_shards": n, "shard": i,
                                          "complete": complete},
                              [], [Artifact(shard, "predictions")], time.time())
    return shard


def test_no_argument_scores_every_shard_of_the_latest_predict_run(cli, tmp_path):
    out = tmp_path / "preds"
    record_shard(cli.manifest, out, 0, 3)
    record_shard(cli.manifest, out, 2, 3)
    record_shard(cli.manifest, out, 1, 3, complete=False)
    assert_user_error(cli("score"), "incomplete", "shard(s) 1 of 3", "--partial")
    result = cli("score", "--partial", "--json", tmp_path / "r.json")
    assert result.code == 0, result.output
    assert load(tmp_path / "r.json")["count"] == 8
    record_shard(cli.manifest, out, 1, 3)
    result = cli("score", "--json", tmp_path / "r.json")
    assert result.code == 0, result.output
    assert load(tmp_path / "r.json")["count"] == 12


def test_no_argument_without_predict_run(cli):
    assert_user_error(cli("score"), "no `predict` run")
