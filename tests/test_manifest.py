"""The artifact ledger: hashes, relative paths, chaining, and concurrent appends."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import orjson
import pytest

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import atomic_output_dir
from cellpuzzle_cli.manifest import Artifact, Manifest, describe


def _append(path: str, i: int) -> None:
    out = Path(path).parent / f"out{i}.txt"
    out.write_text(str(i))
    Manifest(path).record("predict", {"shard_index": i}, [], [Artifact(out, "predictions")],
                          time.time())


def test_entry_records_relative_paths_hashes_and_versions(tmp_path):
    data = tmp_path / "data" / "in.txt"
    data.parent.mkdir()
    data.write_text("hello")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("a")
    (out / "sub").mkdir()
    (out / "sub" / "b.txt").write_text("bb")
    m = Manifest(tmp_path / "cellpuzzle.json")
    m.record("make-qa", {"seed": 1}, [Artifact(data, "cells")], [Artifact(out, "puzzles")],
             time.time(), argv=["cellpuzzle", "make-qa"])
    entry = orjson.loads((tmp_path / "cellpuzzle.json").read_bytes())["entries"][0]
    assert entry["inputs"][0]["path"] == "data/in.txt"
    assert entry["inputs"][0]["sha256"] == \
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert entry["outputs"][0] == {"name": "puzzles", "path": "out", "sha256": describe(out)["sha256"],
                                   "size": 3, "nfiles": 2}
    assert entry["params"] == {"seed": 1}
    assert entry["versions"]["cellpuzzle"]
    assert m.latest_output("make-qa", "puzzles") == out.resolve()


def test_folder_hash_changes_with_content(tmp_path):
    (tmp_path / "x.txt").write_text("1")
    before = describe(tmp_path)["sha256"]
    (tmp_path / "x.txt").write_text("2")
    assert describe(tmp_path)["sha256"] != before


def test_latest_output_prefers_newest_and_sibling_lookup(tmp_path):
    m = Manifest(tmp_path / "m.json")
    for k in range(2):
        d = tmp_path / f"split{k}"
        d.mkdir()
        (d / "train.jsonl").write_text("{}")
        (d / "test.jsonl").write_text("{}")
        m.record("split", {}, [], [Artifact(d / "train.jsonl", "train"),
                                   Artifact(d / "test.jsonl", "test")], time.time())
    assert m.latest_output("split", "test") == (tmp_path / "split1" / "test.jsonl").resolve()
    assert m.find_sibling_output(tmp_path / "split0" / "test.jsonl", "train") == \
        (tmp_path / "split0" / "train.jsonl").resolve()


def test_concurrent_appends_lose_nothing(tmp_path):
    path = str(tmp_path / "m.json")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(path, i)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    entries = Manifest(path).entries()
    assert sorted(e["params"]["shard_index"] for e in entries) == list(range(6))


def test_corrupt_manifest_is_a_user_error(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Manifest(bad).entries()


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_existing_results(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("keep")
    with pytest.raises(UserError, match="--overwrite"), atomic_output_dir(target):
        pass
    assert (target / "old.txt").read_text() == "keep"
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("n")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_one_run_hashes_a_shared_input_once_but_every_output(tmp_path, monkeypatch):
    import cellpuzzle_cli.manifest as manifest_module

    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w" * 1000)
    hashed = []
    real = manifest_module.describe
    monkeypatch.setattr(manifest_module, "describe", lambda p: hashed.append(Path(p)) or real(p))
    m = Manifest(tmp_path / "m.json")
    for i in range(3):  # e.g. three Ray shards recorded by one process
        out = tmp_path / f"shard-{i}.jsonl"
        out.write_text(str(i))
        m.record("predict", {}, [Artifact(model, "model")], [Artifact(out, "predictions")],
                 time.time())
    assert hashed.count(model) == 1
    assert sum(p.name.startswith("shard-") for p in hashed) == 3
    sums = {e["inputs"][0]["sha256"] for e in m.entries()}
    assert sums == {describe(model)["sha256"]}
