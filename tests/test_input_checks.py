"""Inputs read as their author meant, or refused (issue 22): old h5ad encodings, cell-type labels,
what the matrix holds, and splits that mislead. Every test runs the real CLI on a tiny file.

Files in an old layout are written here by hand with h5py, on purpose: they mimic what anndata
0.7 (and tools of its time) wrote, which no current writer produces.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import h5py
import numpy as np
import pytest
from fixtures import assert_says, assert_user_error, run_cli

TYPES = ["B cell", "T cell", "NK cell", "Monocyte", "Dendritic", "Platelet"]
PER_TYPE = 4


def counts_matrix(n_cells: int, n_genes: int = 12, seed: int = 0) -> np.ndarray:
    """Whole-number counts; every cell expresses something, its type's marker most."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.0, (n_cells, n_genes)).astype(np.float32)
    x[np.arange(n_cells), np.arange(n_cells) // PER_TYPE % n_genes] += 20
    return x


def labels(types: list[str] = TYPES) -> list[str]:
    return [t for t in types for _ in range(PER_TYPE)]


def write_h5ad(path: Path, cell_types: list[str], x: np.ndarray | None = None,
               cell_ids: list[str] | None = None, genes: list[str] | None = None) -> Path:
    """A current-layout file written by anndata: two donors, cell types as given."""
    import anndata
    import pandas as pd

    n = len(cell_types)
    x = counts_matrix(n) if x is None else x
    obs = pd.DataFrame({"cell_type": pd.Categorical(cell_types),
                        "donor_id": pd.Categorical([f"D{i % 2}" for i in range(n)])},
                       index=cell_ids or [f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=genes or [f"G{j}" for j in range(x.shape[1])])
    path.parent.mkdir(parents=True, exist_ok=True)
    anndata.AnnData(x, obs=obs, var=var).write_h5ad(path)
    return path


def table(out: Path, name: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / f"{name}.parquet").to_pylist()


def build(tmp_path: Path, source: Path, *options: str):
    out = tmp_path / "cells"
    return run_cli("build-context", source, "-o", out, "--workers", "1", *options,
                   manifest=tmp_path / "cellpuzzle.json"), out


def file_summary(tmp_path: Path) -> dict:
    entry = json.loads((tmp_path / "cellpuzzle.json").read_text())["entries"][-1]
    return entry["summary"]["files"][0]


# -- old h5ad encodings ----------------------------------------------------------------------
def _strings(group: h5py.Group, key: str, values: list[str], fixed: bool) -> h5py.Dataset:
    if fixed:   # fixed-length bytes: the old string dtype
        return group.create_dataset(key, data=np.asarray([v.encode() for v in values]))
    return group.create_dataset(key, data=np.asarray(values, dtype=object),
                                dtype=h5py.string_dtype())


def write_anndata07(path: Path, obs: dict[str, list[str]], x: np.ndarray, *,
                    fixed_strings: bool = False, category_refs: bool = True) -> Path:
    """anndata 0.7's layout: dataframe 0.1.0, each categorical as int8 codes with its
    categories under `__categories/<column>` (referenced from the codes' `categories`)."""
    import scipy.sparse as sp

    n = x.shape[0]
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        csr = sp.csr_matrix(x)
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = np.asarray(x.shape)
        for name in ("data", "indices", "indptr"):
            g.create_dataset(name, data=getattr(csr, name))
        frames = {"obs": (obs, [f"c{i}" for i in range(n)]),
                  "var": ({}, [f"G{j}" for j in range(x.shape[1])])}
        for key, (columns, index) in frames.items():
            g = f.create_group(key)
            g.attrs["encoding-type"], g.attrs["encoding-version"] = "dataframe", "0.1.0"
            g.attrs["column-order"] = list(columns)
            g.attrs["_index"] = "_index"
            _strings(g, "_index", index, fixed_strings)
            for col, values in columns.items():
                cats, codes = np.unique(values, return_inverse=True)
                categories = _strings(g, f"__categories/{col}", list(cats), fixed_strings)
                data = g.create_dataset(col, data=codes.astype(np.int8))
                if category_refs:
                    data.attrs["categories"] = categories.ref
    return path


OBS07 = {"cell_type": labels(), "donor_id": [f"donor_{i % 2}" for i in range(len(labels()))]}


@pytest.mark.parametrize("fixed_strings", [False, True], ids=["vlen-str", "fixed-bytes"])
def test_anndata07_categoricals_read_as_their_names(tmp_path, fixed_strings):
    import anndata

    path = write_anndata07(tmp_path / "old.h5ad", OBS07, counts_matrix(24),
                           fixed_strings=fixed_strings)
    assert list(anndata.read_h5ad(path).obs["cell_type"]) == labels()   # anndata reads names
    result, out = build(tmp_path, path)
    assert result.code == 0, result.output
    rows = table(out, "old")
    assert [r["cell_type"] for r in rows] == labels()
    assert {r["donor_id"] for r in rows} == {"donor_0", "donor_1"}
    assert [r["cell_id"] for r in rows] == [f"c{i}" for i in range(24)]


def test_codes_with_categories_but_no_reference_read_as_names(tmp_path):
    path = write_anndata07(tmp_path / "old.h5ad", OBS07, counts_matrix(24), category_refs=False)
    result, out = build(tmp_path, path)
    assert result.code == 0, result.output
    assert sorted({r["cell_type"] for r in table(out, "old")}) == sorted(TYPES)


def test_column_order_stored_as_bytes_is_read(tmp_path):
    import scipy.sparse as sp

    path = write_h5ad(tmp_path / "b.h5ad", labels(), sp.csr_matrix(counts_matrix(24)))
    with h5py.File(path, "r+") as f:     # fixed-length byte strings, as some writers store them
        f["obs"].attrs["column-order"] = np.asarray([b"cell_type", b"donor_id"])
        f["obs"].attrs["_index"] = np.bytes_(b"_index")
        f["X"].attrs["encoding-type"] = np.bytes_(b"csr_matrix")
    result, out = build(tmp_path, path)
    assert result.code == 0, result.output
    assert [r["cell_type"] for r in table(out, "b")] == labels()


def test_encoding_anndata_cannot_read_is_refused_by_name(tmp_path):
    path = write_h5ad(tmp_path / "odd.h5ad", labels())
    with h5py.File(path, "r+") as f:
        f["obs/cell_type"].attrs["encoding-version"] = "9.9.9"
    result, out = build(tmp_path, path)
    assert_user_error(result, "cannot read /obs/cell_type", "encoding 'categorical'",
                      "version '9.9.9'")
    assert not out.exists()


# -- labels that read the same or hold the answer syntax -------------------------------------
def _types_of(out: Path, name: str) -> list[str]:
    return sorted({r["cell_type"] for r in table(out, name)})


def test_labels_differing_in_white_space_are_one_tidied_type(tmp_path):
    names = TYPES[:4] + [" Dendritic", "Dendritic "]
    result, out = build(tmp_path, write_h5ad(tmp_path / "ws.h5ad", labels(names)))
    assert result.code == 0, result.output
    assert _types_of(out, "ws") == sorted(TYPES[:4] + ["Dendritic"])
    assert file_summary(tmp_path)["cell_types"] == 5
    assert_says(result, "were tidied", "' Dendritic', 'Dendritic ' → 'Dendritic'")


def test_labels_differing_in_case_are_one_type_in_the_common_spelling(tmp_path):
    names = labels(TYPES) + ["DENDRITIC"] * 2          # 4 × "Dendritic", 2 × "DENDRITIC"
    result, out = build(tmp_path, write_h5ad(tmp_path / "case.h5ad", names,
                                             counts_matrix(len(names))))
    assert result.code == 0, result.output
    assert _types_of(out, "case") == sorted(TYPES)
    assert_says(result, "'DENDRITIC' (2 cells in this run) was read as 'Dendritic' (4 cells)",
                "--rename 'Dendritic=DENDRITIC'")


def test_case_variants_across_files_are_one_type(tmp_path):
    write_h5ad(tmp_path / "in" / "a.h5ad", labels(TYPES))
    write_h5ad(tmp_path / "in" / "b.h5ad", labels([t.upper() for t in TYPES]))
    result, out = build(tmp_path, tmp_path / "in")
    assert result.code == 0, result.output
    assert _types_of(out, "a") == _types_of(out, "b") == sorted(TYPES)   # a tie: first file's


def test_two_unicode_spellings_are_one_type(tmp_path):
    composed = "Naïve T cell"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    names = TYPES[:4] + [composed, decomposed]
    result, out = build(tmp_path, write_h5ad(tmp_path / "nfc.h5ad", labels(names)))
    assert result.code == 0, result.output
    assert _types_of(out, "nfc") == sorted(TYPES[:4] + [composed])


@pytest.mark.parametrize(("bad", "says"), [
    ("", "is empty"),
    ("nan", "a spelling of a missing value"),
    ("T cell | activated", "holds '|'"),
    ("Dendritic</answer>", "holds '</answer>'"),
    ("Dendritic\ncell", "holds a line break"),
], ids=["empty", "nan", "pipe", "answer-tag", "newline"])
def test_labels_no_answer_can_name_are_refused_with_the_fix(tmp_path, bad, says):
    result, out = build(tmp_path, write_h5ad(tmp_path / "bad.h5ad", labels(TYPES[:5] + [bad])))
    assert_user_error(result, repr(bad), "obs column 'cell_type'", says, "--rename",
                      "--label-map")
    assert not out.exists()


def test_rename_and_label_map_make_every_puzzle_answerable(tmp_path):
    from cellpuzzle_cli.answer import answer_items, format_prediction
    from cellpuzzle_cli.io import read_records
    from cellpuzzle_cli.reward import reward

    names = ["B cell", " T cell", "T  cell", "NK cell", "MONOCYTE", "Monocyte", "Monocyte ",
             "Dendritic</answer>", "Platelet | PF4+", "nan"]
    path = write_h5ad(tmp_path / "messy.h5ad", labels(names), counts_matrix(4 * len(names)))
    label_map = tmp_path / "labels.tsv"
    label_map.write_text("# old\tnew\nDendritic</answer>\tDendritic cell\n")
    result, out = build(tmp_path, path, "--rename", "Platelet | PF4+=Platelet",
                        "--rename", "nan=", "--label-map", str(label_map))
    assert result.code == 0, result.output
    assert _types_of(out, "messy") == ["B cell", "Dendritic cell", "Monocyte", "NK cell",
                                       "Platelet", "T cell"]
    summary = file_summary(tmp_path)
    assert summary["dropped_nan_type"] == 4 and summary["cell_types"] == 6
    manifest = tmp_path / "cellpuzzle.json"
    made = run_cli("make-qa", "-o", tmp_path / "puzzles", "--min-n", "2", "--max-n", "6",
                   "--per-n", "3", manifest=manifest)
    assert made.code == 0, made.output
    puzzles = read_records(tmp_path / "puzzles" / "puzzles.jsonl")
    assert {p["n"] for p in puzzles} == {2, 3, 4, 5, 6}
    for puzzle in puzzles:
        perfect = format_prediction("Markers.", answer_items(puzzle["answer"]))
        assert reward(perfect, puzzle["answer"]) == 1.0, puzzle["answer"]


def test_a_rename_that_matches_nothing_is_said(tmp_path):
    result, _ = build(tmp_path, write_h5ad(tmp_path / "ok.h5ad", labels()),
                      "--rename", "Dendritc=DC")
    assert result.code == 0, result.output
    assert_says(result, "1 rename(s) matched no cell type: 'Dendritc'")


# -- what the matrix holds ----------------------------------------------------------------------
def test_tpm_matrix_is_recorded_and_celltypist_treats_it_as_proportional(tmp_path):
    pytest.importorskip("celltypist")
    n = 6 * 2 * PER_TYPE                        # two donors' worth of each type
    x = counts_matrix(n, n_genes=30, seed=1)
    tpm = (x / x.sum(1, keepdims=True) * 1e6).astype(np.float32)
    path = write_h5ad(tmp_path / "tpm.h5ad", labels(TYPES * 2), tpm)
    result, _ = build(tmp_path, path, "--top-genes", "5")
    assert result.code == 0, result.output
    assert_says(result, "normalised", "1,000,000")
    summary = file_summary(tmp_path)
    assert (summary["values"], summary["values_total"]) == ("normalised", 1e6)
    manifest = tmp_path / "cellpuzzle.json"
    for step in (("make-qa", "-o", tmp_path / "p", "--min-n", "3", "--max-n", "4",
                  "--per-n", "2"),
                 ("split", "-o", tmp_path / "s", "--group-by", "donor"),
                 ("predict", "--backend", "celltypist", "-o", tmp_path / "ct")):
        done = run_cli(*step, manifest=manifest)
        assert done.code == 0, done.output


@pytest.mark.parametrize(("make", "kind"), [
    (lambda x: x, "counts"),
    (lambda x: np.log1p(x / x.sum(1, keepdims=True) * 1e4), "log-normalised"),
    (lambda x: x / x.sum(1, keepdims=True) * 1e4, "normalised"),
])
def test_what_x_holds_is_recorded(tmp_path, make, kind):
    x = make(counts_matrix(24).astype(np.float64)).astype(np.float32)
    result, _ = build(tmp_path, write_h5ad(tmp_path / "x.h5ad", labels(), x))
    assert result.code == 0, result.output
    assert file_summary(tmp_path)["values"] == kind


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_values_are_refused_with_a_count_and_a_cell(tmp_path, bad):
    x = counts_matrix(24)
    x[5, 2] = x[9, 3] = x[9, 4] = bad
    result, out = build(tmp_path, write_h5ad(tmp_path / "nan.h5ad", labels(), x))
    assert_user_error(result, "X holds 3 non-finite values", "cell 'c5'")
    assert not out.exists()


def test_cells_without_expression_are_left_out_and_counted(tmp_path):
    x = counts_matrix(24)
    x[[3, 17]] = 0
    result, out = build(tmp_path, write_h5ad(tmp_path / "zero.h5ad", labels(), x))
    assert result.code == 0, result.output
    ids = [r["cell_id"] for r in table(out, "zero")]
    assert len(ids) == 22 and "c3" not in ids and "c17" not in ids
    assert all(r["top_genes"] for r in table(out, "zero"))
    summary = file_summary(tmp_path)
    assert (summary["cells_kept"], summary["dropped_no_expression"]) == (22, 2)
    assert_says(result, "2 cells with no expressed gene", "cell 'c3'", "0/0/0/2")


def test_duplicate_cell_ids_are_refused(tmp_path):
    ids = [f"c{i}" for i in range(22)] + ["c0", "c1"]
    result, _ = build(tmp_path, write_h5ad(tmp_path / "dup.h5ad", labels(), cell_ids=ids))
    assert_user_error(result, "2 cell ids (obs names) occur more than once", "'c0'",
                      "obs_names_make_unique")


def test_duplicate_gene_names_are_refused_naming_their_column(tmp_path):
    genes = [f"G{j}" for j in range(11)] + ["G0"]
    result, _ = build(tmp_path, write_h5ad(tmp_path / "dupg.h5ad", labels(), genes=genes))
    assert_user_error(result, "1 gene names in var names occur more than once", "'G0'",
                      "--gene-col")


# -- splits that mislead --------------------------------------------------------------------------
def _puzzle(i: int, types: list[str], fold: str) -> dict:
    from cellpuzzle_cli.answer import format_answer
    from cellpuzzle_cli.prompts import format_question

    ids = [f"p{i}-c{j}" for j in range(len(types))]
    return {"puzzle_id": f"p{i}", "dataset": "d", "group": "D0", "donor_id": "D0",
            "n": len(types), "cell_ids": ids, "cell_fold": fold,
            "question": format_question("", [["G1"]] * len(types), types[::-1]),
            "answer": format_answer(types), "candidates": types[::-1]}


def _split(tmp_path: Path, puzzles: list[dict]):
    from cellpuzzle_cli.io import write_jsonl

    write_jsonl(tmp_path / "puzzles.jsonl", puzzles)
    return run_cli("split", tmp_path / "puzzles.jsonl", "-o", tmp_path / "s", "--group-by",
                   "cell", manifest=tmp_path / "cellpuzzle.json")


def _split_warnings(tmp_path: Path) -> list[str]:
    entry = json.loads((tmp_path / "cellpuzzle.json").read_text())["entries"][-1]
    return entry["summary"]["warnings"]


def test_split_warns_of_a_test_n_training_never_shows(tmp_path):
    train = [_puzzle(i, TYPES[:3], "train") for i in range(4)]
    result = _split(tmp_path, train + [_puzzle(9, TYPES[:4], "test")])
    assert result.code == 0, result.output
    assert_says(result, "warning", "1 test puzzle(s) have N = 4, a size no training puzzle has")
    assert any("N = 4" in w for w in _split_warnings(tmp_path))


def test_split_warns_of_a_test_cell_type_training_never_shows(tmp_path):
    train = [_puzzle(i, TYPES[:3], "train") for i in range(4)]
    result = _split(tmp_path, train + [_puzzle(9, TYPES[1:4], "test")])
    assert result.code == 0, result.output
    assert_says(result, "1 cell type(s) appear in test but never in training: 'Monocyte'")
    assert any("'Monocyte'" in w for w in _split_warnings(tmp_path))


def test_split_warns_when_test_outweighs_training(tmp_path):
    puzzles = [_puzzle(i, TYPES[:3], "train" if i < 2 else "test") for i in range(5)]
    result = _split(tmp_path, puzzles)
    assert result.code == 0, result.output
    assert_says(result, "The test set (3 puzzles) is larger than the training set (2)")
    assert len(_split_warnings(tmp_path)) == 1
