"""Every fault is a clear error: bad files, a hostile environment, bad values, unsafe pickles,
wrong inputs, kills at the worst moment. Each case runs the real CLI and checks what a user
sees: exit 2, one paragraph naming the fix, no traceback, nothing new on disk (or exit 0 where
the input must work)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from fixtures import (
    assert_user_error,
    donors_dataset,
    gold_records,
    make_records,
    prediction_lines,
    run_cli,
    tiny_model_dir,
    write_records,
)

LONG = "x" * 300


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Cells, puzzles and a split made by the real commands, shared by the cases below."""
    root = tmp_path_factory.mktemp("pipeline")
    cells = donors_dataset(root / "cells", n_donors=4)
    manifest = root / "m.json"
    assert run_cli("make-qa", cells, "-o", root / "puzzles", "--per-n", "3",
                   manifest=manifest).code == 0
    assert run_cli("split", root / "puzzles", "-o", root / "splits", manifest=manifest).code == 0
    return {"root": root, "cells": cells, "puzzles": root / "puzzles",
            "train": root / "splits" / "train.jsonl", "test": root / "splits" / "test.jsonl"}


def refused_leaving_nothing(tmp_path: Path, args: list, *fragments: str) -> None:
    """Runs `cellpuzzle ARGS` (with a manifest in tmp_path) and checks the promise."""
    before = files_under(tmp_path)
    result = run_cli(*args, manifest=tmp_path / "cellpuzzle.json")
    assert_user_error(result, *fragments)
    assert files_under(tmp_path) == before, "the failed run left files behind"


# -- files the user names that are not what we expect ----------------------------------------
@pytest.fixture
def not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 1\n# caf\xe9\n".encode("latin-1"))
    return path


@pytest.mark.parametrize("command", ["make-qa", "split", "to-parquet", "predict"])
def test_config_that_is_not_utf8(pipeline, tmp_path, not_utf8, command):
    source = {"make-qa": pipeline["cells"], "split": pipeline["puzzles"],
              "to-parquet": pipeline["train"], "predict": None}[command]
    args = [command, "-o", tmp_path / "out", "--config", not_utf8]
    if source is not None:
        args.insert(1, source)
    else:
        args += ["--data", pipeline["test"], "--backend", "baseline", "--train", pipeline["train"]]
    refused_leaving_nothing(tmp_path, args, "latin1.yaml", "not UTF-8", "Save it as UTF-8")


def test_system_prompt_file_that_is_not_utf8_or_a_folder(pipeline, tmp_path, not_utf8):
    refused_leaving_nothing(tmp_path, ["split", pipeline["puzzles"], "-o", tmp_path / "s",
                                       "--system-prompt-file", not_utf8], "not UTF-8")
    refused_leaving_nothing(tmp_path, ["split", pipeline["puzzles"], "-o", tmp_path / "s",
                                       "--system-prompt-file", pipeline["root"]], "is a folder")


def small_h5ad(path: Path) -> Path:
    from cellpuzzle_cli.synthetic import SyntheticSpec, write_synthetic_h5ad

    return write_synthetic_h5ad(path, SyntheticSpec(n_cells=40, n_genes=60, nnz_per_cell=20))


def test_context_config_that_is_not_utf8_or_a_folder(tmp_path, not_utf8):
    h5ad = small_h5ad(tmp_path / "in" / "a.h5ad")
    for bad, fragment in ((not_utf8, "not UTF-8"), (tmp_path / "in", "is a folder")):
        refused_leaving_nothing(tmp_path, ["build-context", h5ad, "-o", tmp_path / "cells",
                                           "--context-config", bad], fragment)


@pytest.mark.parametrize("command", ["make-qa", "predict"])
def test_a_folder_given_as_config(pipeline, tmp_path, command):
    args = ([command, pipeline["cells"]] if command == "make-qa" else
            [command, "--data", pipeline["test"], "--backend", "baseline"])
    refused_leaving_nothing(tmp_path, [*args, "-o", tmp_path / "o", "--config", tmp_path],
                            "is a folder", "path of a file")


def test_score_json_into_a_folder(tmp_path):
    preds = write_records(tmp_path / "p.jsonl", prediction_lines(gold_records(["T | B"]), ["x"]))
    (tmp_path / "report").mkdir()
    refused_leaving_nothing(tmp_path, ["score", preds, "--json", tmp_path / "report"],
                            "report", "is a folder")


def test_split_of_a_json_array_of_numbers(tmp_path):
    numbers = tmp_path / "puzzles.json"
    numbers.write_bytes(b"[1, 2, 3]")
    refused_leaving_nothing(tmp_path, ["split", numbers, "-o", tmp_path / "s"],
                            "Record 1", "not an object")


@pytest.mark.parametrize("document, fragment", [
    (None, "is a folder"),
    ({"schema": 1}, "no 'entries' list"),
    ({"schema": 1, "entries": [{"id": "a", "command": "split", "params": {}, "inputs": [],
                                "started": "t", "finished": "t", "duration_s": 1}]},
     "lacks 'outputs'"),
])
def test_malformed_manifest_stops_before_any_work(pipeline, tmp_path, document, fragment):
    manifest = tmp_path / "ledger.json"
    if document is None:
        manifest.mkdir()
    else:
        manifest.write_bytes(orjson.dumps(document))
    result = run_cli("make-qa", pipeline["cells"], "-o", tmp_path / "puzzles", manifest=manifest)
    assert_user_error(result, fragment)
    assert not (tmp_path / "puzzles").exists()


# -- the environment ---------------------------------------------------------------------------
def mounted_tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A 64 KiB tmpfs at `mount` while the test runs; skips where mounting is not allowed."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options}size=64k", "tmpfs", str(mount)],
                      check=False, capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}size=64k) here (needs root or "
                    "CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A tiny disk, so writes fail with ENOSPC."""
    yield from mounted_tmpfs(tmp_path / "disk", "")


@pytest.fixture
def read_only_disk(tmp_path):
    yield from mounted_tmpfs(tmp_path / "ro", "ro,")


@pytest.mark.parametrize("command", ["make-qa", "split", "to-parquet"])
def test_disk_full(pipeline, tmp_path, small_disk, command):
    manifest = tmp_path / "m.json"
    if command == "make-qa":
        args = [command, pipeline["cells"], "--per-n", "40"]
    elif command == "split":  # enough puzzles that their split outgrows the disk
        assert run_cli("make-qa", pipeline["cells"], "-o", tmp_path / "many", "--per-n", "40",
                       manifest=manifest).code == 0
        args = [command, tmp_path / "many"]
    else:
        big = write_records(tmp_path / "big.jsonl", make_records(300, seed=2, genes_per_cell=30))
        args = [command, big]
    result = run_cli(*args, "-o", small_disk / "out", manifest=manifest)
    assert_user_error(result, "No space left", "nothing half-written was kept")
    assert list(small_disk.iterdir()) == []


def test_manifest_on_a_full_disk(pipeline, tmp_path, small_disk):
    with pytest.raises(OSError):  # fill the disk to the last byte
        (small_disk / "filler").write_bytes(b"\0" * 100_000)
    result = run_cli("make-qa", pipeline["cells"], "-o", tmp_path / "puzzles",
                     manifest=small_disk / "m.json")
    assert_user_error(result, "No space left")
    assert not (small_disk / "m.json").exists()


@pytest.mark.parametrize("command", ["make-qa", "to-parquet"])
def test_read_only_output_folder(pipeline, tmp_path, read_only_disk, command):
    source = pipeline["cells"] if command == "make-qa" else pipeline["train"]
    result = run_cli(command, source, "-o", read_only_disk / "out", manifest=tmp_path / "m.json")
    assert_user_error(result, "read-only", "-o")


@pytest.mark.parametrize("command", ["make-qa", "split", "to-parquet"])
def test_output_name_longer_than_the_file_system_allows(pipeline, tmp_path, command):
    source = {"make-qa": pipeline["cells"], "split": pipeline["puzzles"],
              "to-parquet": pipeline["train"]}[command]
    refused_leaving_nothing(tmp_path, [command, source, "-o", tmp_path / LONG],
                            "longer than the file system allows", "shorter")


# -- values handed to libraries unchecked --------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["make-qa", "{cells}", "--seed", "-5"], "between 0 and 4,294,967,295"),
    (["make-qa", "{cells}", "--seed", "4294967296"], "between 0 and 4,294,967,295"),
    (["make-qa", "{cells}", "--per-n", "0"], "'per_n' must be at least 1"),
    (["split", "{puzzles}", "--seed", "-1"], "'seed' must be between"),
    (["split", "{puzzles}", "--max-test", "0"], "'max_test' must be at least 1"),
    (["split", "{puzzles}", "--group-by", "tissue"], "one of donor, dataset, cell"),
    (["to-parquet", "{train}", "--val-size", "-1"], "'val_size' must be at least 0"),
    (["predict", "--backend", "baseline", "--data", "{test}", "temperature=-1"],
     "'temperature' must be at least 0"),
    (["predict", "--backend", "baseline", "--data", "{test}", "--max-new-tokens", "0"],
     "'max_new_tokens' must be at least 1"),
    (["predict", "--backend", "baseline", "--data", "{test}", "top_p=2"],
     "'top_p' must be greater than 0 and at most 1"),
    (["predict", "--backend", "baseline", "--data", "{test}", "--seed", "-3"], "'seed' must be"),
    (["predict", "--backend", "baseline", "--data", "{test}", "dtype=float8"], "one of auto"),
    (["rl", "grpo", "--dry-run", "trainer.total_training_steps=-3"],
     "'trainer.total_training_steps' must be at least 1"),
    (["rl", "grpo", "--dry-run", "trainer.total_training_steps=abc"],
     "'trainer.total_training_steps' must be a whole number"),
    (["rl", "grpo", "--dry-run", "cellpuzzle.seed=ten"], "'cellpuzzle.seed' must be a whole number"),
    (["rl", "grpo", "--dry-run", "--seed", "-1"], "'cellpuzzle.seed' must be between 0 and"),
    (["rl", "grpo", "--dry-run", "actor_rollout_ref.actor.optim.lr=-1"], "greater than 0"),
])
def test_bad_values_are_refused_before_any_work(pipeline, tmp_path, args, fragment):
    args = [str(a).format(**pipeline) for a in args]
    refused_leaving_nothing(tmp_path, [*args, "-o", tmp_path / "out"], fragment)


def test_a_yaml_file_and_overrides_read_numbers_alike(pipeline, tmp_path):
    from cellpuzzle_cli.config import layer_settings, parse_overrides
    from cellpuzzle_cli.predict.settings import PredictSettings

    path = tmp_path / "p.yaml"
    path.write_text("temperature: 7e-1\ntop_p: 5e-1\n")
    from_file = layer_settings(PredictSettings, path)
    from_overrides = layer_settings(PredictSettings, None,
                                  parse_overrides(["temperature=7e-1", "top_p=5e-1"]))
    assert from_file == from_overrides and from_file.temperature == 0.7


# -- unsafe files ------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory):
    """A model folder whose weights are a pickle that would run a command when unpickled."""
    folder = tiny_model_dir(tmp_path_factory.mktemp("evil") / "model")
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Payload()}, fh)
    return folder


@pytest.mark.parametrize("command", ["predict", "sft"])
def test_malicious_weights_are_refused_without_suggesting_unsafe_loading(
        pipeline, pickled_model, tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ([command, "--model", pickled_model, "--data", pipeline["test"], "--backend", "hf",
             "-o", tmp_path / "o"] if command == "predict" else
            [command, "--model", pickled_model, "--data", pipeline["train"], "-o", tmp_path / "o",
             "max_steps=1"])
    result = run_cli(*args, manifest=tmp_path / "m.json")
    assert_user_error(result, "pytorch_model.bin", "could run code", "refused")
    assert "weights_only=False" not in result.output.replace(" ", "")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o").exists()


# -- wrong inputs that used to be accepted ------------------------------------------------------
def test_training_answers_must_use_each_candidate_once(tmp_path):
    records = make_records(4, seed=3)
    records[2]["assistant_msg"] = " | ".join(["T cell"] * records[2]["n"])
    bad = write_records(tmp_path / "train.jsonl", records)
    refused_leaving_nothing(tmp_path, ["to-parquet", bad, "-o", tmp_path / "rl"],
                            records[2]["puzzle_id"], "used at most once")


def test_score_reference_without_overlap(pipeline, tmp_path):
    elsewhere = gold_records(["T | B"], prefix="elsewhere")
    preds = write_records(tmp_path / "p.jsonl", prediction_lines(elsewhere, ["x"]))
    refused_leaving_nothing(tmp_path, ["score", preds, "--reference", pipeline["test"]],
                            "None of the 1 predictions", "test split")


def test_manifest_last_takes_positive_numbers(tmp_path):
    result = run_cli("manifest", "--last", "-2", manifest=tmp_path / "m.json")
    assert_user_error(result, "--last", "greater than or equal to 0")


# -- inputs that must work -----------------------------------------------------------------------
def test_symlinked_files_and_folders_mirror_the_link_names(tmp_path):
    real = tmp_path / "store"
    small_h5ad(real / "a.h5ad")
    small_h5ad(real / "sub" / "b.h5ad")
    links = tmp_path / "links"
    links.mkdir()
    (links / "renamed.h5ad").symlink_to(real / "a.h5ad")
    (links / "folder").symlink_to(real / "sub", target_is_directory=True)
    result = run_cli("build-context", links, "-o", tmp_path / "cells",
                     manifest=tmp_path / "m.json")
    assert result.code == 0, result.output
    made = sorted(p.relative_to(tmp_path / "cells").as_posix()
                  for p in (tmp_path / "cells").rglob("*.parquet"))
    assert made == ["folder/b.parquet", "renamed.parquet"]


# -- kills at the worst moments -----------------------------------------------------------------
KILLER = r"""
import os, signal, sys, tempfile
moment, args = sys.argv[1], sys.argv[2:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "working":      # the output is half-written in its .partial folder
    real_mkdtemp = tempfile.mkdtemp
    def mkdtemp(*a, **k):
        path = real_mkdtemp(*a, **k)
        if path.endswith(".partial"):
            open(os.path.join(path, "half-written"), "w").write("x")
            die()
        return path
    tempfile.mkdtemp = mkdtemp
elif moment == "published":  # the output is complete, the manifest does not know it yet
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if str(src).endswith(".partial"):
            die()
    os.replace = replace
elif moment == "recording":  # killed inside the manifest update
    from cellpuzzle_cli import manifest
    manifest.write_json = lambda *a, **k: die()
from cellpuzzle_cli.cli import main
main(args)
"""


def _command(name: str, pipeline: dict, tmp_path: Path) -> list[str]:
    if name == "build-context":
        h5ad = small_h5ad(tmp_path / "in" / "a.h5ad")
        return ["build-context", str(h5ad), "-o", str(tmp_path / "out"), "--workers", "1"]
    source = {"make-qa": pipeline["cells"], "split": pipeline["puzzles"],
              "to-parquet": pipeline["train"]}[name]
    return [name, str(source), "-o", str(tmp_path / "out")]


@pytest.mark.parametrize("moment", ["working", "published", "recording"])
@pytest.mark.parametrize("name", ["build-context", "make-qa", "split", "to-parquet"])
def test_a_killed_step_reruns_to_one_recorded_output(pipeline, tmp_path, name, moment):
    manifest = tmp_path / "m.json"
    args = ["--manifest", str(manifest), *_command(name, pipeline, tmp_path)]
    killed = subprocess.run([sys.executable, "-c", KILLER, moment, *args], check=False,
                            capture_output=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    again = run_cli(*args)
    assert again.code == 0, again.output
    entries = orjson.loads(manifest.read_bytes())["entries"]
    assert [e["command"] for e in entries] == [name]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert not (tmp_path / "out" / "half-written").exists()
