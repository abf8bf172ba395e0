"""The artifact ledger: hashes, relative paths, chaining, and concurrent appends."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import orjson
import pytest

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import atomic_output_dir
from cellpuzzle_cli.manifest import Artifact, Kind, Manifest, describe
from cellpuzzle_cli.runner import STAMP_FILE, Stamp
from cellpuzzle_cli.steps import STEPS, kind_of


def _append(path: str, i: int) -> None:
    out = Path(path).parent / f"out{i}.txt"
    out.write_text(str(i))
    Manifest(path).record("predict", {"shard_index": i}, [],
                          [STEPS["predict"].artifact("predictions", out)], time.time())


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
    m.record("make-qa", {"seed": 1}, [Artifact(data, "cells")],
             [STEPS["make-qa"].artifact("puzzles", out)], time.time(),
             argv=["cellpuzzle", "make-qa"])
    entry = orjson.loads((tmp_path / "cellpuzzle.json").read_bytes())["entries"][0]
    assert entry["inputs"][0]["path"] == "data/in.txt"
    assert entry["inputs"][0]["sha256"] == \
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert entry["outputs"][0] == {"name": "puzzles", "path": "out", "sha256": describe(out)["sha256"],
                                   "size": 3, "nfiles": 2, "kind": "puzzles"}
    assert entry["params"] == {"seed": 1}
    assert entry["versions"]["cellpuzzle"]
    assert m.latest_output(Kind.PUZZLES) == out.resolve()


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
        m.record("split", {}, [], [STEPS["split"].artifact("train", d / "train.jsonl"),
                                   STEPS["split"].artifact("test", d / "test.jsonl")], time.time())
    assert m.latest_output(Kind.TEST_PUZZLES) == (tmp_path / "split1" / "test.jsonl").resolve()
    assert m.sibling_output(tmp_path / "split0" / "test.jsonl", Kind.TRAIN_PUZZLES) == \
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
    assert sorted(e.params["shard_index"] for e in entries) == list(range(6))


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
        m.record("predict", {}, [Artifact(model, "model")],
                 [STEPS["predict"].artifact("predictions", out)], time.time())
    assert hashed.count(model) == 1
    assert sum(p.name.startswith("shard-") for p in hashed) == 3
    sums = {e.inputs[0].sha256 for e in m.entries()}
    assert sums == {describe(model)["sha256"]}


@pytest.mark.parametrize("document, fragment", [
    ({"schema": 1}, "no 'entries' list"),
    ({"schema": 1, "entries": [{"id": "a", "command": "split"}]}, "entry 1 lacks 'params'"),
    ({"schema": 1, "entries": [{"id": "a", "command": "split", "params": {}, "inputs": [],
                                "started": "t", "finished": "t", "duration_s": 1}]},
     "entry 1 lacks 'outputs'"),
    ({"schema": 1, "entries": [{"id": "a", "command": "split", "params": {}, "inputs": [],
                                "outputs": [{"path": "x"}], "started": "t", "finished": "t",
                                "duration_s": 1}]}, "output 1 lacks a text 'name'"),
    ({"schema": 1, "entries": ["split"]}, "entry 1 is not an object"),
])
def test_malformed_manifest_names_what_is_wrong(tmp_path, document, fragment):
    bad = tmp_path / "m.json"
    bad.write_bytes(orjson.dumps(document))
    with pytest.raises(UserError, match="malformed") as info:
        Manifest(bad).check()
    assert fragment in str(info.value)


def test_manifest_that_is_a_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        Manifest(tmp_path).check()


def test_every_model_producer_is_found_as_the_latest_model(tmp_path):
    m = Manifest(tmp_path / "m.json")
    makers = [c for c, spec in STEPS.items() if Kind.MODEL in spec.output_kinds().values()]
    assert {"init-model", "merge-lora", "convert-ckpt", "rl grpo"} <= set(makers)
    for command in makers:
        folder = tmp_path / command.replace(" ", "-")
        folder.mkdir()
        name = next(n for n, k in STEPS[command].output_kinds().items() if k is Kind.MODEL)
        m.record(command, {}, [], [STEPS[command].artifact(name, folder)], time.time())
        assert m.latest_output(Kind.MODEL) == folder.resolve(), command


def test_entries_written_before_outputs_carried_their_kind_still_answer(tmp_path):
    """A manifest from an older cellpuzzle (outputs without `kind`) is read with the step
    table's kinds, so its latest model is still found; without them it simply has none."""
    folder = tmp_path / "sft-model"
    folder.mkdir()
    path = tmp_path / "m.json"
    Manifest(path).record("merge-lora", {}, [], [Artifact(folder, "model")], time.time())
    assert "kind" not in orjson.loads(path.read_bytes())["entries"][0]["outputs"][0]
    assert Manifest(path).latest_output(Kind.MODEL) is None
    assert Manifest(path, kind_of=kind_of).latest_output(Kind.MODEL) == folder.resolve()


def test_base_model_of_an_adapter(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    for folder in (base, adapter):
        folder.mkdir()
    m = Manifest(tmp_path / "m.json")
    m.record("sft", {}, [Artifact(base, "base_model")], [STEPS["sft"].artifact("adapter", adapter)],
             time.time())
    assert m.base_model_of(adapter) == base.resolve()
    assert m.base_model_of(base) is None


def test_a_step_knows_its_own_output_recorded_or_not(tmp_path):
    data, out = tmp_path / "in.txt", tmp_path / "out"
    data.write_text("cells")
    m = Manifest(tmp_path / "m.json")
    outputs = [STEPS["make-qa"].artifact("puzzles", out)]

    def stamp(seed: int = 1, ledger: Manifest = m) -> Stamp:
        return Stamp(ledger, "make-qa", {"seed": seed}, [Artifact(data, "cells")], outputs, out)

    assert stamp().state() == "new"
    with stamp().publishing(), atomic_output_dir(out) as tmp:
        (tmp / "puzzles.jsonl").write_text("{}")
    assert (out / STAMP_FILE).is_file()
    assert stamp().state() == "unrecorded"      # killed between publishing and recording
    assert stamp(seed=2).state() == "new"       # other settings: not this run's output
    m.record("make-qa", {"seed": 1}, [Artifact(data, "cells")], outputs, time.time(),
             extra={"key": stamp().key})
    assert stamp().state() == "up to date"
    (out / "puzzles.jsonl").write_text("edited")
    assert stamp().state() == "new"             # changed since it was recorded
    data.write_text("other cells")
    assert stamp(ledger=Manifest(m.path)).state() == "new"


def test_manifest_fits_80_columns_with_full_timestamps_and_wide_shows_all(cli, tmp_path,
                                                                          monkeypatch):
    from cellpuzzle_cli.cli.common import console

    deep = tmp_path / "projects" / "a-rather-long-study-name" / "round-2" / "predictions-sft"
    deep.mkdir(parents=True)
    shard = deep / "shard-0-of-1.jsonl"
    shard.write_text("{}\n")
    test = tmp_path / "splits" / "test.jsonl"
    test.parent.mkdir()
    test.write_text("{}\n")
    m = Manifest(cli.manifest)
    m.record("predict", {}, [Artifact(test, "test")],
             [STEPS["predict"].artifact("predictions", shard)], time.time() - 3725)
    m.record("build-context", {}, [], [STEPS["build-context"].artifact("cells", deep)],
             time.time())
    monkeypatch.setattr(console, "width", 80)
    shown = cli("manifest")
    assert shown.code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, shown.stdout
    for entry in m.entries():        # the date and the time of day, to the second
        stamp = entry.finished[:19].replace("T", " ")
        assert any(stamp in line for line in lines), (stamp, shown.stdout)
    shortened = [line for line in lines if "→ …" in line]   # cut from the left: the ends stay
    assert len(shortened) == 2 and "-sft/shard-0-of-1.jsonl" in shortened[0]
    assert "/round-2/predictions-sft" in shortened[1]
    assert "← splits/test.jsonl" in shown.stdout and "1h02m" in shown.stdout
    wide = cli("manifest", "--wide")
    recorded = m.entries()[0].outputs[0]
    assert recorded.path in wide.stdout and recorded.sha256[:12] in wide.stdout
    assert m.entries()[0].id in wide.stdout
