"""`annotate` under hostile input (issue 22's fresh pass, docs/hostile-inputs.md): matrices of odd
types and values, genes only partly shared, candidates and known labels in odd spellings, and a
model's work folder left by an interrupted run. Each test runs the real CLI on scanpy's PBMC
cells and checks what was written, not only the exit code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_annotate_cli as shared
from fixtures import assert_says, assert_user_error, message_text, tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")
pbmc = shared.pbmc   # the fixture: a reference and a query of scanpy's PBMC cells
LABELS, _variant = shared.LABELS, shared._variant


def _run(cli, query: Path, ref: Path, out: Path, *extra: str):
    return cli("annotate", query, "--reference", ref, "--cell-type-col", LABELS, "-o", out,
               "plot=false", *extra)


def _obs(path: Path):
    import anndata

    return anndata.read_h5ad(path).obs


def _dense(adata, dtype=np.float32, edit=None):
    """The log-normalised .raw as a dense X of `dtype` (no .raw), `edit` applied to it."""
    raw = adata.raw.to_adata()
    raw.obs = adata.obs.copy()
    x = np.asarray(raw.X.todense(), dtype=np.float64)
    if edit is not None:
        edit(x)
    raw.X = x.astype(dtype)
    return raw


def _nan_row(x: np.ndarray) -> None:
    x[5, :] = np.nan


def test_a_float16_matrix_is_read_like_float32(cli, tmp_path, pbmc):
    wide = _variant(pbmc["query"], tmp_path / "f32.h5ad", _dense)
    half = _variant(pbmc["query"], tmp_path / "f16.h5ad", lambda a: _dense(a, np.float16))
    for name, query in (("a", wide), ("b", half)):
        result = _run(cli, query, pbmc["ref"], tmp_path / name)
        assert result.code == 0, result.output
    a, b = _obs(tmp_path / "a" / "f32.h5ad"), _obs(tmp_path / "b" / "f16.h5ad")
    assert (a["cellpuzzle_label"] == b["cellpuzzle_label"]).mean() > 0.95


def test_non_finite_values_are_refused_in_query_and_reference(cli, tmp_path, pbmc):
    query = _variant(pbmc["query"], tmp_path / "nan.h5ad", lambda a: _dense(a, edit=_nan_row))
    out = tmp_path / "out"
    assert_user_error(_run(cli, query, pbmc["ref"], out), "non-finite values", "row 5",
                      "as adata[5]")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    ref = _variant(pbmc["ref"], tmp_path / "ref-nan.h5ad", lambda a: _dense(a, edit=_nan_row))
    assert_user_error(_run(cli, pbmc["query"], ref, out, "--cluster-col", "louvain"),
                      "ref-nan.h5ad", "non-finite values", "row 5")
    assert not out.exists()


def test_cells_without_expression_are_unassigned_and_counted(cli, tmp_path, pbmc):
    def silent(x: np.ndarray) -> None:
        x[:4, :] = 0

    query = _variant(pbmc["query"], tmp_path / "zero.h5ad", lambda a: _dense(a, edit=silent))
    result = _run(cli, query, pbmc["ref"], tmp_path / "out", "--format", "json")
    assert result.code == 0, result.output
    obs = _obs(tmp_path / "out" / "zero.h5ad")
    assert (obs["cellpuzzle_label"].iloc[:4] == "unassigned").all()
    assert (obs["cellpuzzle_confidence"].iloc[:4] == 0).all()
    assert (obs["cellpuzzle_label"].iloc[4:] != "unassigned").mean() > 0.9
    warnings = json.loads(result.stdout)["warnings"]
    assert any("4 cells express no gene the reference knows" in w for w in warnings)


def test_a_query_sharing_few_genes_with_the_reference_is_warned_about(cli, tmp_path, pbmc):
    def renamed(adata):
        raw = _dense(adata)
        raw.var_names = [g if i < 5 else f"XG{i}" for i, g in enumerate(raw.var_names)]
        return raw

    query = _variant(pbmc["query"], tmp_path / "five.h5ad", renamed)
    result = _run(cli, query, pbmc["ref"], tmp_path / "out", "--cluster-col", "louvain")
    assert result.code == 0, result.output
    assert_says(result, "share only 5 gene names", "the labels rest on those genes alone")


def test_candidates_are_tidied_and_written_as_the_reference_spells_them(cli, tmp_path, pbmc):
    names = tmp_path / "candidates.txt"
    names.write_bytes("\ufeffcd19+  b\r\nDENDRITIC\r\n".encode())   # a BOM, CRLF, odd case
    result = _run(cli, pbmc["query"], pbmc["ref"], tmp_path / "out", "--cluster-col", "louvain",
                  "--candidates", str(names))
    assert result.code == 0, result.output
    labels = set(_obs(tmp_path / "out" / "query.h5ad")["cellpuzzle_label"].astype(str))
    assert labels == {"CD19+ B", "Dendritic", "unassigned"}


def test_known_labels_are_read_as_build_context_reads_labels(cli, tmp_path, pbmc):
    def missing(adata):
        truth = adata.obs["truth"].astype(str).to_numpy().copy()
        truth[:60] = "nan"
        truth[60:80] = " "
        adata.obs["truth"] = truth
        return adata

    query = _variant(pbmc["query"], tmp_path / "q.h5ad", missing)
    out = tmp_path / "out"
    result = _run(cli, query, pbmc["ref"], out, "--cluster-col", "louvain", "--truth-col",
                  "truth", "--format", "json")
    assert result.code == 0, result.output
    scores = json.loads(result.stdout)["summary"]["files"][0]["evaluation"]
    assert scores["cells"] == 220 and scores["no_label"] == 80
    obs = _obs(out / "q.h5ad").iloc[80:]
    agree = (obs["cellpuzzle_label"].astype(str).str.lower()
             == obs["truth"].astype(str).str.lower()).mean()
    assert scores["agreement"] == pytest.approx(agree)


def test_known_labels_that_name_no_candidate_are_called_out(cli, tmp_path, pbmc):
    result = _run(cli, pbmc["query"], pbmc["ref"], tmp_path / "out", "--cluster-col", "louvain",
                  "--truth-col", "louvain")
    assert result.code == 0, result.output
    assert_says(result, "300 of the 300 known labels in 'louvain' name no candidate type",
                "check that --truth-col is the column of cell type names")


# -- a model's work folder ---------------------------------------------------------------------
def _votes(cli, query: Path, ref: Path, out: Path, model: Path):
    return cli("annotate", query, "--reference", ref, "--cell-type-col", LABELS, "--backend", "hf",
               "--model", model, "-o", out, "plot=false", "--cluster-col", "louvain",
               "puzzles_per_cluster=1", "max_new_tokens=4")


def _plant_answers(work: Path) -> int:
    """Every answer in the work folder rewritten to name the puzzle's first candidates in
    order (a well-formed answer the tiny model would never give)."""
    from cellpuzzle_cli.io import iter_jsonl, write_jsonl

    planted = 0
    for shard in work.glob("**/answers/shard-*.jsonl"):
        puzzles = {r["puzzle_id"]: r for r in iter_jsonl(shard.parent.parent / "puzzles.jsonl")}
        rows = list(iter_jsonl(shard))
        for row in rows:
            asked = puzzles[row["puzzle_id"]]
            row["prediction"] = ("<think>x</think>\n<answer>"
                                 + " | ".join(asked["candidates"][:asked["n"]]) + "</answer>")
        write_jsonl(shard, rows)
        planted += len(rows)
    return planted


def test_votes_of_an_interrupted_run_are_resumed_only_for_the_same_puzzles(cli, tmp_path, pbmc):
    model = tiny_model_dir(tmp_path / "model")
    queries = tmp_path / "queries"
    queries.mkdir()
    first = _variant(pbmc["query"], queries / "a.h5ad", lambda a: a)
    _variant(pbmc["query"], queries / "b.h5ad", lambda a: _dense(a, edit=_nan_row))
    out, work = tmp_path / "ann", tmp_path / ".ann.votes"
    assert_user_error(_votes(cli, queries, pbmc["ref"], out, model), "non-finite values")
    assert _plant_answers(work) > 0          # a.h5ad's answers wait in the work folder
    (tmp_path / "other").mkdir()
    other = _variant(pbmc["ref"], tmp_path / "other" / "a.h5ad", lambda a: a)
    result = _votes(cli, other, pbmc["ref"], out, model)  # other cells, the same file name
    assert result.code == 0, result.output
    assert set(_obs(out / "a.h5ad")["cellpuzzle_label"].astype(str)) == {"unassigned"}
    assert not work.exists()
    assert_user_error(_votes(cli, queries, pbmc["ref"], tmp_path / "ann2", model),
                      "non-finite values")
    _plant_answers(tmp_path / ".ann2.votes")
    result = _votes(cli, first, pbmc["ref"], tmp_path / "ann2", model)  # the very same puzzles
    assert result.code == 0 and "not in the answer format" not in message_text(result)
    assert (_obs(tmp_path / "ann2" / "a.h5ad")["cellpuzzle_label"] != "unassigned").all()


def test_a_model_that_fails_to_load_leaves_no_work_folder(cli, tmp_path, pbmc):
    model = tiny_model_dir(tmp_path / "model")
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    out = tmp_path / "ann"
    assert_user_error(_votes(cli, pbmc["query"], pbmc["ref"], out, model), "Could not load")
    assert not out.exists() and not list(tmp_path.glob(".ann*"))


def test_an_output_inside_the_query_folder_is_not_read_as_a_query(cli, tmp_path, pbmc):
    folder = tmp_path / "sample"
    folder.mkdir()
    _variant(pbmc["query"], folder / "a.h5ad", lambda a: a)
    out = folder / "annotated"
    assert _run(cli, folder, pbmc["ref"], out, "--cluster-col", "louvain").code == 0
    again = _run(cli, folder, pbmc["ref"], out, "--cluster-col", "louvain", "seed=1",
                 "--overwrite", "--format", "json")
    assert again.code == 0, again.output
    assert [f["output"] for f in json.loads(again.stdout)["summary"]["files"]] == ["a.h5ad"]
    assert sorted(p.name for p in out.glob("*.h5ad")) == ["a.h5ad"]
    assert not (out / "annotated").exists()


def test_blank_cluster_names_are_no_cluster(cli, tmp_path, pbmc):
    def blank(adata):
        names = adata.obs["louvain"].astype(str).to_numpy().copy()
        names[:30], names[30:40] = "", "nan"
        adata.obs["mine"] = names
        return adata

    query = _variant(pbmc["query"], tmp_path / "q.h5ad", blank)
    out = tmp_path / "out"
    assert_user_error(_run(cli, query, pbmc["ref"], out, "--cluster-col", "mine"),
                      "40 cells have no value in 'mine' (missing, empty or 'nan')")
    assert not out.exists()


def test_a_reference_folder_whose_h5ad_files_are_gone_says_so(cli, tmp_path, pbmc):
    source = _variant(pbmc["ref"], tmp_path / "r.h5ad", lambda a: a)
    cells = tmp_path / "cells"
    assert cli("build-context", source, "--cell-type-col", LABELS, "-o", cells).code == 0
    source.unlink()
    result = _run(cli, pbmc["query"], cells, tmp_path / "out", "--backend", "celltypist",
                  "--cluster-col", "louvain")
    assert_user_error(result, "the manifest records them", "are no longer there", "r.h5ad",
                      "put them back")
