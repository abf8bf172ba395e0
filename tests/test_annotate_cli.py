"""`cellpuzzle annotate` through the CLI: the step (manifest, rerun, JSON), known labels
compared at the end, a trained model's votes, and bad input (one paragraph, exit 2, nothing
written)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures import assert_user_error, make_records, message_text, tiny_model_dir, write_records

from cellpuzzle_cli.annotate.puzzle_votes import PuzzleShape, tally, vote_puzzles

PBMC = Path(__import__("scanpy").__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"
LABELS = "bulk_labels"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pbmc(tmp_path_factory) -> dict:
    """A third of the 700 cells as reference, the rest as query with its labels kept under
    `truth` (read only to compare with)."""
    import anndata

    folder = tmp_path_factory.mktemp("pbmc")
    adata = anndata.read_h5ad(PBMC)
    order = np.random.default_rng(1).permutation(adata.n_obs)
    ref, query = adata[np.sort(order[:400])].copy(), adata[np.sort(order[400:])].copy()
    query.obs = query.obs.rename(columns={LABELS: "truth"})
    ref.write_h5ad(folder / "reference.h5ad")
    query.write_h5ad(folder / "query.h5ad")
    return {"ref": folder / "reference.h5ad", "query": folder / "query.h5ad"}


def _annotate(cli, pbmc, out: Path, *extra: str):
    return cli("annotate", pbmc["query"], "--reference", pbmc["ref"], "--cell-type-col", LABELS,
               "-o", out, "plot=false", *extra)


def test_annotate_is_a_step_with_a_json_outcome_and_known_labels_compared(cli, tmp_path, pbmc):
    result = _annotate(cli, pbmc, tmp_path / "ann", "--truth-col", "truth", "--format", "json")
    assert result.code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["state"] == "done" and Path(outcome["outputs"]["annotations"]).is_dir()
    scores = outcome["summary"]["files"][0]["evaluation"]
    assert scores["agreement"] > 0.65 and scores["agreement"] > 3 * scores["chance_uniform"]
    assert 0 < scores["macro_f1"] <= 1 and scores["cells"] == 300
    assert (tmp_path / "ann" / "annotate.yaml").is_file()
    entry = json.loads(cli.manifest.read_text())["entries"][-1]
    assert entry["command"] == "annotate" and entry["outputs"][0]["kind"] == "annotations"
    assert {i["name"] for i in entry["inputs"]} == {"query", "reference"}
    again = _annotate(cli, pbmc, tmp_path / "ann", "--truth-col", "truth")
    assert again.code == 0 and "is up to date" in message_text(again)


def test_the_truth_column_never_changes_a_label(cli, tmp_path, pbmc):
    import anndata

    for name, extra in (("blind", ()), ("compared", ("--truth-col", "truth"))):
        assert _annotate(cli, pbmc, tmp_path / name, *extra).code == 0
    blind, compared = (anndata.read_h5ad(tmp_path / n / "query.h5ad").obs
                       for n in ("blind", "compared"))
    assert (blind["cellpuzzle_label"] == compared["cellpuzzle_label"]).all()


# -- a trained model's votes -------------------------------------------------------------------
def test_votes_deal_every_cluster_into_every_round_and_read_planted_answers():
    cells = {"a": [["CD3D"]], "b": [["MS4A1"]], "c": [["LYZ"]], "d": [["PPBP"]]}
    types = ["T cell", "B cell", "monocyte", "platelet", "natural killer cell"]
    truth = dict(zip("abcd", types))
    records = vote_puzzles(cells, types, PuzzleShape(3, 4), rounds=6, seed=2)
    assert records == vote_puzzles(cells, types, PuzzleShape(3, 4), rounds=6, seed=2)
    seen = {c: sum(r["clusters"].count(c) for r in records) for c in cells}
    assert all(count >= 6 for count in seen.values())
    assert all(len(set(r["candidates"])) == 4 and r["n"] == 3 for r in records)
    # a model that names every cell's true type, and one answer that cannot be read
    answers = {r["puzzle_id"]: "<think>\nCell 1 -> x\n</think>\n<answer>"
               + " | ".join(truth[c] for c in r["clusters"]) + "</answer>" for r in records}
    answers[records[0]["puzzle_id"]] = "\n\n"
    votes = tally(records, answers, list(cells), types)
    assert votes.unreadable == 1 and votes.answered == len(records) - 1
    best = votes.shares().argmax(axis=1)
    assert [types[i] for i in best] == [truth[c] for c in cells]
    assert votes.reason_for_best()["a"].startswith("Cell")


def test_a_model_backend_run_uses_its_training_types_and_says_when_answers_are_unreadable(
        cli, tmp_path, pbmc):
    from cellpuzzle_cli.manifest import Artifact, Manifest
    from cellpuzzle_cli.steps import STEPS

    records = make_records(12)
    train = write_records(tmp_path / "splits" / "train.jsonl", records)
    model = tiny_model_dir(tmp_path / "model", records)
    ledger = Manifest(cli.manifest)
    ledger.record("split", {}, [], [STEPS["split"].artifact("train", train)], time.time())
    ledger.record("init-model", {}, [Artifact(train, "train")],
                  [STEPS["init-model"].artifact("model", model)], time.time())
    result = cli("annotate", pbmc["query"], "--backend", "hf", "-o", tmp_path / "votes",
                 "plot=false", "puzzles_per_cluster=1", "max_new_tokens=8", "cells_per_cluster=2",
                 "--cluster-col", "louvain")
    assert result.code == 0, result.output
    text = message_text(result)
    assert "Using model from the manifest" in text and "not in the answer format" in text
    saved = json.loads(cli.manifest.read_text())["entries"][-1]
    assert sorted(saved["summary"]["candidates"]) == sorted(
        {t for r in records for t in r["assistant_msg"].split(" | ")})
    assert not list(tmp_path.glob(".votes*"))   # the work folder goes once published


# -- bad input ---------------------------------------------------------------------------------
def _variant(src: Path, dst: Path, edit) -> Path:
    import anndata

    adata = anndata.read_h5ad(src)
    adata = edit(adata)
    adata.write_h5ad(dst)
    return dst


def _refused(result, out: Path, *fragments: str) -> None:
    assert_user_error(result, *fragments)
    assert not out.exists()


def test_bad_input_is_one_paragraph_and_leaves_nothing(cli, tmp_path, pbmc):
    out = tmp_path / "out"

    def run(query=pbmc["query"], ref=pbmc["ref"], *extra):
        return cli("annotate", query, "--reference", ref, "--cell-type-col", LABELS, "-o", out,
                   *extra)

    renamed = _variant(pbmc["query"], tmp_path / "ids.h5ad", lambda a: _gene_ids(a))
    _refused(run(query=renamed), out, "share no gene name", "Ensembl IDs", "gene symbols")
    one_type = _variant(pbmc["ref"], tmp_path / "one.h5ad",
                        lambda a: a[a.obs[LABELS] == "CD19+ B"].copy())
    _refused(run(ref=one_type), out, "has 1 cell type", "nothing to choose between")
    empty = _variant(pbmc["query"], tmp_path / "empty.h5ad", lambda a: a[:0].copy())
    _refused(run(query=empty), out, "holds no cells")
    scaled = _variant(pbmc["query"], tmp_path / "scaled.h5ad", _without_raw)
    _refused(run(query=scaled), out, "negative values", ".raw")
    _refused(run(pbmc["query"], pbmc["ref"], "--candidates", "CD19+ B,Neutrophil"), out,
             "'Neutrophil' is not a cell type")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run(), "already holds results", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_a_model_folder_that_is_not_a_cellpuzzle_model(cli, tmp_path, pbmc):
    not_a_model = tmp_path / "weights"
    not_a_model.mkdir()
    (not_a_model / "README").write_text("a folder of something else")
    out = tmp_path / "out"
    _refused(cli("annotate", pbmc["query"], "--backend", "hf", "--model", not_a_model, "-o",
                 out), out, "not a Hugging Face model folder")
    foreign = tiny_model_dir(tmp_path / "foreign")      # a model no cellpuzzle run recorded
    _refused(cli("annotate", pbmc["query"], "--backend", "hf", "--model", foreign, "-o", out),
             out, "not one the manifest records", "--candidates")


def _gene_ids(adata):
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    if adata.raw is not None:
        raw = adata.raw.to_adata()
        raw.var_names = [f"ENSG{i:011d}" for i in range(raw.n_vars)]
        adata.raw = raw
    return adata


def _without_raw(adata):
    del adata.raw
    return adata
