"""Shard specs, the shard partition and resuming a shard file (no model needed)."""

from __future__ import annotations

import random

import pytest
from fixtures import answered, assert_user_error, make_records, prediction_lines, write_records

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.predict.records import ShardWriter, load_test_records, read_done
from cellpuzzle_cli.predict.shards import Shard, parse_shard, select_shard, shard_filename


def test_shard_spec_parsing():
    assert parse_shard("2/5") == Shard(2, 5)
    assert parse_shard(" 0 / 1 ") == Shard(0, 1)
    assert parse_shard(None) == Shard(0, 1)
    assert shard_filename(1, 4) == "shard-1-of-4.jsonl"


@pytest.mark.parametrize("spec, fragment", [("3/3", "between 0 and 2"), ("0/0", "at least 1"),
                                            ("a/b", "not of the form i/n"), ("-1/2", "between 0"),
                                            ("1", "not of the form")])
def test_bad_shard_specs_are_refused(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_shard(spec)


@pytest.mark.parametrize("spec", ["3/3", "0/0", "a/b"])
def test_bad_shard_spec_exits_2_from_the_cli(cli, spec):
    assert_user_error(cli("predict", "--shard", spec), "--shard", spec)


def test_three_shards_partition_the_set_balanced_and_independent_of_file_order(tmp_path):
    records = make_records(31)
    shards = [select_shard(records, Shard(i, 3)) for i in range(3)]
    ids = [[r["puzzle_id"] for r in s] for s in shards]
    assert sorted(x for shard in ids for x in shard) == sorted(r["puzzle_id"] for r in records)
    assert sum(len(s) for s in ids) == len({x for s in ids for x in s})  # no overlap
    assert sorted(len(s) for s in ids) == [10, 10, 11]
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    assert [[r["puzzle_id"] for r in select_shard(shuffled, Shard(i, 3))] for i in range(3)] == ids


def test_records_need_unique_ids_and_a_prompt(tmp_path):
    records = make_records(3)
    records[2]["puzzle_id"] = records[0]["puzzle_id"]
    with pytest.raises(UserError, match="more than once"):
        load_test_records(write_records(tmp_path / "dup.jsonl", records))
    with pytest.raises(UserError, match="user_msg"):
        load_test_records(write_records(tmp_path / "bad.jsonl", [{"puzzle_id": "x"}]))


def test_records_without_ids_get_stable_ids_from_their_prompt(tmp_path):
    records = make_records(4)
    for r in records:
        del r["puzzle_id"]
    first = load_test_records(write_records(tmp_path / "a.jsonl", records))
    again = load_test_records(write_records(tmp_path / "b.jsonl", records[::-1]))
    ids = {r["user_msg"]: r["puzzle_id"] for r in first}
    assert ids == {r["user_msg"]: r["puzzle_id"] for r in again}  # each prompt keeps its id
    assert len(set(ids.values())) == len(records)


def test_resume_drops_a_torn_last_line_and_keeps_whole_ones(tmp_path):
    records = make_records(3)
    a, b, c = (r["puzzle_id"] for r in records)
    path = tmp_path / "shard-0-of-1.jsonl"
    lines = prediction_lines(records[:2], [answered(r["assistant_msg"]) for r in records[:2]])
    ShardWriter(path).append(lines)
    whole = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(f'{{"puzzle_id": "{c}", "predic'.encode())
    done = read_done(path, {a, b, c})
    assert done == {a: lines[0], b: lines[1]}
    assert path.read_bytes() == whole  # the torn tail is gone, so the next append is clean


def test_resume_refuses_lines_from_another_shard_or_a_corrupt_middle(tmp_path):
    path = tmp_path / "s.jsonl"
    ShardWriter(path).append([{"puzzle_id": "a"}, {"puzzle_id": "zzz"}])
    with pytest.raises(UserError, match="not in this shard"):
        read_done(path, {"a"})
    path.write_bytes(b'{"puzzle_id": "a"}\nnot json\n{"puzzle_id": "b"}\n')
    with pytest.raises(UserError, match="corrupt"):
        read_done(path, {"a", "b"})
