"""to-parquet: verl's RL schema, loadable by pandas and datasets, seeded group-aware val split."""

from __future__ import annotations

import orjson
from fixtures import assert_user_error, make_records, write_records

from cellpuzzle_cli.prompts import SYSTEM_PROMPT


def test_rows_follow_verls_schema_and_load_everywhere(cli, tmp_path):
    import datasets
    import pandas as pd

    records = make_records(24, seed=3, n_donors=6)
    train = write_records(tmp_path / "train.jsonl", records)
    out = tmp_path / "rl"
    result = cli("to-parquet", train, "-o", out, "--val-size", "0.25", "--seed", "1")
    assert result.code == 0, result.output
    tr, va = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "val.parquet")
    assert len(tr) + len(va) == 24 and len(va) >= 6
    assert list(tr.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = tr.iloc[0]
    assert row["data_source"] == "cellpuzzle"
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["prompt"][0]["content"] == SYSTEM_PROMPT
    by_id = {r["puzzle_id"]: r for r in records}
    src = by_id[row["extra_info"]["puzzle_id"]]
    assert row["prompt"][1]["content"] == src["user_msg"]
    assert row["reward_model"]["style"] == "rule"
    assert row["reward_model"]["ground_truth"] == src["assistant_msg"]
    assert row["extra_info"]["split"] == "train" and row["extra_info"]["n"] == src["n"]
    # group-aware: no donor on both sides
    assert not {e["group"] for e in tr["extra_info"]} & {e["group"] for e in va["extra_info"]}
    assert set(va["extra_info"].map(lambda e: e["split"])) == {"val"}

    ds = datasets.load_dataset("parquet", data_files={"train": str(out / "train.parquet"),
                                                      "val": str(out / "val.parquet")})
    assert ds["train"].num_rows == len(tr) and ds["val"].num_rows == len(va)
    assert ds["train"][0]["prompt"][1]["role"] == "user"

    entry = orjson.loads(cli.manifest.read_bytes())["entries"][-1]
    assert [o["name"] for o in entry["outputs"]] == ["train", "val"]


def test_seeded_and_byte_identical(cli, tmp_path):
    train = write_records(tmp_path / "train.jsonl", make_records(20, seed=4, n_donors=5))
    for name, seed in (("a", 0), ("b", 0), ("c", 7)):
        assert cli("to-parquet", train, "-o", tmp_path / name, "--seed", seed).code == 0
    read = lambda n: (tmp_path / n / "val.parquet").read_bytes()
    assert read("a") == read("b")
    assert (tmp_path / "a" / "train.parquet").read_bytes() == (tmp_path / "b" / "train.parquet").read_bytes()
    assert read("a") != read("c")


def test_single_group_falls_back_to_random_puzzles_and_json_arrays_work(cli, tmp_path):
    """A CellPuzzles-style JSON array: no group, reasoning targets with <answer> tags."""
    import pandas as pd

    records = [{k: r[k] for k in ("system_msg", "user_msg")}
               | {"assistant_msg": f"<think>\nx\n</think>\n<answer>{r['assistant_msg']}</answer>"}
               for r in make_records(10, seed=5)]
    path = tmp_path / "cellpuzzles.json"
    path.write_bytes(orjson.dumps(records))
    assert cli("to-parquet", path, "-o", tmp_path / "rl", "--val-size", "3").code == 0
    tr, va = (pd.read_parquet(tmp_path / "rl" / f"{s}.parquet") for s in ("train", "val"))
    assert (len(tr), len(va)) == (7, 3)
    gold = {r["user_msg"]: r["assistant_msg"] for r in records}
    for _, row in tr.iterrows():
        assert f"<answer>{row['reward_model']['ground_truth']}</answer>" in gold[row["prompt"][1]["content"]]


def test_zero_val_writes_an_empty_loadable_val_file(cli, tmp_path):
    import pandas as pd

    train = write_records(tmp_path / "train.jsonl", make_records(5, seed=6))
    assert cli("to-parquet", train, "-o", tmp_path / "rl", "--val-size", "0").code == 0
    val = pd.read_parquet(tmp_path / "rl" / "val.parquet")
    assert len(val) == 0 and "reward_model" in val.columns


def test_takes_the_latest_split_from_the_manifest(cli, tmp_path):
    from cellpuzzle_cli.manifest import Artifact, Manifest

    train = write_records(tmp_path / "splits" / "train.jsonl", make_records(8, seed=7))
    Manifest(cli.manifest).record("split", {}, [], [Artifact(train, "train")], started=0.0)
    assert cli("to-parquet", "-o", tmp_path / "rl").code == 0
    assert (tmp_path / "rl" / "train.parquet").is_file()


def test_wrong_fields_and_existing_output_are_refused(cli, tmp_path):
    bad = write_records(tmp_path / "bad.jsonl", [{"user_msg": "Cell 1: CD3E", "label": "T cell"}])
    assert_user_error(cli("to-parquet", bad, "-o", tmp_path / "rl"), "assistant_msg", "label, user_msg")
    train = write_records(tmp_path / "train.jsonl", make_records(5, seed=8))
    assert cli("to-parquet", train, "-o", tmp_path / "rl").code == 0
    again = cli("to-parquet", train, "-o", tmp_path / "rl")  # the same run: nothing to redo
    assert again.code == 0 and "is up to date" in again.output
    other = cli("to-parquet", train, "-o", tmp_path / "rl", "--val-size", "2")
    assert_user_error(other, "already holds results")


def test_rl_rows_are_reusable():
    from cellpuzzle_cli.to_parquet import rl_rows

    rows = rl_rows(make_records(3, seed=9), split="test", start_index=10)
    assert [r["extra_info"]["index"] for r in rows] == [10, 11, 12]
    assert {r["extra_info"]["split"] for r in rows} == {"test"}
