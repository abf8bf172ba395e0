"""Evaluation beyond Cell-o1's metrics: ontology IDs through the pipeline, hierarchical and
per-type metrics, chance, the CellTypist reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fixtures import (
    answered,
    assert_user_error,
    gold_records,
    message_text,
    prediction_lines,
    run_cli,
    write_records,
)

from cellpuzzle_cli.synthetic import SyntheticSpec, write_synthetic_h5ad

CD4, CD8, T, B, NAIVE_CD4 = "CL:0000624", "CL:0000625", "CL:0000084", "CL:0000236", "CL:0000895"


def write_predictions(path: Path, golds: list[str], answers: list[str], **fields) -> Path:
    """predict's lines answering puzzles with gold `golds` by `answers` (item lists joined)."""
    lines = prediction_lines(gold_records(golds, **fields), [answered(a) for a in answers])
    return write_records(path, lines)


@pytest.fixture(scope="module")
def id_pipeline(tmp_path_factory) -> dict[str, Path]:
    """A CELLxGENE file with only *_ontology_term_id columns, taken to a donor split."""
    root = tmp_path_factory.mktemp("ids")
    h5ad = write_synthetic_h5ad(root / "data" / "atlas.h5ad", SyntheticSpec(
        n_cells=360, n_genes=200, nnz_per_cell=40, n_donors=4, n_cell_types=6, term_ids=True,
        labels=False, seed=5))
    manifest = root / "cellpuzzle.json"
    steps = [("build-context", h5ad, "-o", root / "cells", "--top-genes", "10", "--workers", "1"),
             ("make-qa", "-o", root / "puzzles", "--min-n", "3", "--max-n", "5", "--per-n", "6"),
             ("split", "-o", root / "splits", "--group-by", "donor", "--seed", "0")]
    outputs = []
    for step in steps:
        result = run_cli(*step, manifest=manifest)
        assert result.code == 0, result.output
        outputs.append(message_text(result))
    return {"root": root, "manifest": manifest, "h5ad": h5ad, "build_output": outputs[0]}


# -- ontology IDs through the pipeline -------------------------------------------------------
def test_labels_read_from_ontologies_when_only_ids_exist(id_pipeline):
    import pyarrow.parquet as pq

    from cellpuzzle_cli.ontology import term_label

    flat = id_pipeline["build_output"]
    assert flat.count("obs has only ontology term IDs") == 1
    assert "cell_type, sex, development_stage" in flat
    table = pq.read_table(id_pipeline["root"] / "cells" / "atlas.parquet").to_pylist()
    row = table[0]
    assert row["cell_type"] == term_label(row["cell_type_ontology_term_id"])
    assert row["cell_type"] in {"B cell", "CD4-positive, alpha-beta T cell",
                                "CD8-positive, alpha-beta T cell", "natural killer cell",
                                "classical monocyte", "non-classical monocyte"}
    assert row["sex"] in {"female", "male"} and row["tissue"] in {"blood", "lung", "spleen"}
    assert f"The donor is {row['sex']}." in row["context"]


def test_ids_reach_puzzles_splits_and_predictions(id_pipeline, tmp_path):
    from cellpuzzle_cli.io import read_records
    from cellpuzzle_cli.ontology import term_label

    root = id_pipeline["root"]
    puzzle = read_records(root / "puzzles" / "puzzles.jsonl")[0]
    items = [s.strip() for s in puzzle["answer"].split("|")]
    assert [term_label(t) for t in puzzle["cell_type_ids"]] == items
    test = read_records(root / "splits" / "test.jsonl")
    assert all(len(r["cell_type_ids"]) == r["n"] for r in test)

    result = run_cli("predict", "--backend", "baseline", "-o", tmp_path / "preds",
                     manifest=id_pipeline["manifest"])
    assert result.code == 0, result.output
    lines = read_records(tmp_path / "preds" / "shard-0-of-1.jsonl")
    by_id = {r["puzzle_id"]: r for r in test}
    assert all(line["cell_type_ids"] == by_id[line["puzzle_id"]]["cell_type_ids"]
               for line in lines)
    result = run_cli("score", tmp_path / "preds", "--json", tmp_path / "s.json",
                     manifest=id_pipeline["manifest"])
    assert result.code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    tree = report["hierarchical"]
    assert tree["relations"]["gold"] == pytest.approx(report["cell_accuracy"])
    assert 0 < tree["hierarchical_f1"] <= 1
    assert "Hierarchical F1" in result.output


def test_cell_type_id_col_must_exist(id_pipeline, tmp_path):
    result = run_cli("build-context", id_pipeline["h5ad"], "-o", tmp_path / "cells",
                     "--cell-type-id-col", "author_cl_id", manifest=tmp_path / "m.json")
    assert_user_error(result, "no column 'author_cl_id'", "--cell-type-id-col")


def test_hierarchical_section_omitted_without_ids(tmp_path):
    gold = "B cells | NK cells | T cells"
    path = write_predictions(tmp_path / "run" / "p.jsonl", [gold], [gold])
    result = run_cli("score", path.parent, "--json", tmp_path / "s.json",
                     manifest=tmp_path / "m.json")
    assert result.code == 0, result.output
    assert "Hierarchical metrics omitted" in result.output
    assert "omitted" in json.loads((tmp_path / "s.json").read_text())["hierarchical"]


# -- hierarchical metrics on a hand-checked ontology fragment --------------------------------
FRAGMENT = {  # term -> label, ancestors (as the shipped files store them: term -> distance)
    "CL:0000000": {"label": "cell", "ancestors": {}},
    T: {"label": "T cell", "ancestors": {"CL:0000000": 1}},
    CD4: {"label": "CD4-positive, alpha-beta T cell", "ancestors": {T: 1, "CL:0000000": 2}},
    CD8: {"label": "CD8-positive, alpha-beta T cell", "ancestors": {T: 1, "CL:0000000": 2}},
    NAIVE_CD4: {"label": "naive CD4 T cell",
                "ancestors": {CD4: 1, T: 2, "CL:0000000": 3}},
    B: {"label": "B cell", "ancestors": {"CL:0000000": 1}},
}


def test_hierarchical_metrics_equal_hand_computed_values(tmp_path):
    """Five puzzles, gold `CD4 | B cell`; the CD4 cell answered as itself, its parent, its
    child, its sibling and an unrelated type, the B cell always right.

    Ancestor sets without the root: CD4 {CD4, T}, T {T}, naive {naive, CD4, T}, CD8 {CD8, T},
    B {B}. Overlaps with A(CD4): 2, 1, 2, 1, 0 (+1 per B cell); |A(pred)|: 2, 1, 3, 2, 1 (+1);
    |A(gold)| 2 (+1). So hP = (6 + 5) / (9 + 5) = 11/14 and hR = 11/15.
    """
    from cellpuzzle_cli.ontology import CellOntology
    from cellpuzzle_cli.score.hierarchy import hierarchical
    from cellpuzzle_cli.score.judging import judge_run

    gold = "CD4-positive, alpha-beta T cell | B cell"
    answers = ["CD4-positive, alpha-beta T cell", "T cell", "naive CD4 T cell",
               "CD8-positive, alpha-beta T cell", "B cell"]
    path = write_predictions(tmp_path / "p.jsonl", [gold] * len(answers),
                             [f"{a} | B cell" for a in answers], cell_type_ids=[CD4, B])
    judged = judge_run("run", [path])
    tree = hierarchical(judged.cells, onto=CellOntology(FRAGMENT, "fragment"))
    assert tree.precision == pytest.approx(11 / 14)
    assert tree.recall == pytest.approx(11 / 15)
    assert tree.f1 == pytest.approx(2 * (11 / 14) * (11 / 15) / (11 / 14 + 11 / 15))
    assert tree.cells == 10
    assert tree.shares == pytest.approx({"gold": 0.6, "ancestor": 0.1, "descendant": 0.1,
                                         "unrelated": 0.2, "unmapped": 0.0, "no_answer": 0.0})


def test_relations_on_the_shipped_cell_ontology(tmp_path):
    """Real CL: T cell is an ancestor of CD4 αβ T cells, a naive CD4 αβ T cell a descendant,
    CD8 αβ T cells a sibling (unrelated); an unknown label is unmapped; a label table works."""
    from cellpuzzle_cli.score.hierarchy import hierarchical, read_label_ids
    from cellpuzzle_cli.score.judging import judge_run

    gold = "CD4 T | B"
    answers = ["T cell", "naive thymus-derived CD4-positive, alpha-beta T cell", "CD8 T",
               "helper blob"]
    table = tmp_path / "labels.tsv"
    table.write_text(f"label\tcell_type_ontology_term_id\nCD4 T\t{CD4}\nCD8 T\t{CD8}\nB\t{B}\n")
    path = write_predictions(tmp_path / "p.jsonl", [gold] * len(answers),
                             [f"{a} | B" for a in answers])
    tree = hierarchical(judge_run("run", [path]).cells, read_label_ids(table))
    assert tree.omitted is None and tree.cells == 8
    assert tree.shares == pytest.approx({"gold": 0.5, "ancestor": 0.125, "descendant": 0.125,
                                         "unrelated": 0.125, "unmapped": 0.125,
                                         "no_answer": 0.0})


def test_label_table_errors_name_the_fix(tmp_path):
    from cellpuzzle_cli.errors import UserError
    from cellpuzzle_cli.score.hierarchy import read_label_ids

    bad = tmp_path / "bad.tsv"
    bad.write_text("B cell\tCL:0000236\nT cell CL:0000084\n")
    with pytest.raises(UserError, match="line 2"):
        read_label_ids(bad)


# -- per-type metrics and chance ---------------------------------------------------------------
def test_per_type_metrics_equal_scikit_learn(tmp_path):
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from cellpuzzle_cli.score.judging import judge_run
    from cellpuzzle_cli.score.per_type import NONE, per_type

    types = ["B cell", "T cell", "NK cell", "monocyte", "platelet"]
    rng = np.random.default_rng(7)
    golds, answers, y_true, y_pred = [], [], [], []
    for i in range(60):
        n = int(rng.integers(2, 6))
        gold = list(rng.choice(types, n, replace=False))
        pred = [str(rng.choice([*types, "neutrophil"])) for _ in range(n)]
        if i % 7 == 0 and n > 2:   # (a single item has no "|": illegitimate)
            pred = pred[:-1]                           # a missing item: "(no answer)"
        golds.append(" | ".join(gold))
        answers.append(" | ".join(pred))
        y_true += gold
        y_pred += pred + [NONE] * (n - len(pred))
    judged = judge_run("run", [write_predictions(tmp_path / "p.jsonl", golds, answers)])
    got = per_type(judged.cells)
    labels = sorted(set(y_true), key=str.lower)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert got.types == labels
    assert np.allclose(got.precision, p) and np.allclose(got.recall, r)
    assert np.allclose(got.f1, f) and np.array_equal(got.support, s)
    assert got.macro_f1 == pytest.approx(f1_score(y_true, y_pred, labels=labels,
                                                  average="macro", zero_division=0))
    assert np.array_equal(got.confusion[:, :len(labels)],
                          confusion_matrix(y_true, y_pred, labels=labels))
    assert got.confusion.sum() == len(y_true)


def test_chance_in_json_and_table(tmp_path):
    from cellpuzzle_cli.score.chance import chance

    sizes = np.array([3, 3, 5])
    assert chance(sizes) == pytest.approx({"chance_cell_accuracy": 3 / 11,
                                           "chance_exact_match": (2 / 6 + 1 / 120) / 3})
    gold3, gold5 = "a | b | c", "a | b | c | d | e"
    path = write_predictions(tmp_path / "run" / "p.jsonl", [gold3, gold5], [gold3, gold5])
    result = run_cli("score", path.parent, "--json", tmp_path / "s.json", "--plot",
                     tmp_path / "by_n.png", manifest=tmp_path / "m.json")
    assert result.code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["chance_cell_accuracy"] == pytest.approx(2 / 8)
    assert report["by_n"]["5"]["chance_exact_match"] == pytest.approx(1 / math.factorial(5))
    assert "0.200 / 0.00833" in result.output            # the By-N table's chance column
    assert (tmp_path / "by_n-confusion.png").stat().st_size > 0


# -- the CellTypist reference ------------------------------------------------------------------
def test_celltypist_reference_predicts_and_scores(id_pipeline, tmp_path):
    from cellpuzzle_cli.io import read_records

    result = run_cli("predict", "--backend", "celltypist", "-o", tmp_path / "ct",
                     manifest=id_pipeline["manifest"])
    assert result.code == 0, result.output
    lines = read_records(tmp_path / "ct" / "shard-0-of-1.jsonl")
    assert {line["backend"] for line in lines} == {"celltypist"}
    assert all(line["cell_type_ids"] for line in lines)
    result = run_cli("score", tmp_path / "ct", "--json", tmp_path / "s.json",
                     manifest=id_pipeline["manifest"])
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["format_legitimacy"] == 1.0 and report["uniqueness"] == 1.0
    assert report["cell_accuracy"] > report["chance_cell_accuracy"] + 0.3
    again = run_cli("predict", "--backend", "celltypist", "-o", tmp_path / "ct2",
                    manifest=id_pipeline["manifest"])
    assert again.code == 0, again.output
    first = [line["prediction"] for line in lines]   # seeded: the same answers again
    assert [line["prediction"] for line in read_records(tmp_path / "ct2" / "shard-0-of-1.jsonl")
            ] == first


def test_celltypist_normalises_counts_tpm_and_log_data_alike():
    import scipy.sparse as sp

    from cellpuzzle_cli.build_context.values import MatrixValues
    from cellpuzzle_cli.build_context.values import log1p_cp10k as normalise

    counts = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 5.0]]))
    expected = np.log1p(counts.toarray() / counts.toarray().sum(1, keepdims=True) * 1e4)
    assert np.allclose(normalise(counts, MatrixValues("counts")).toarray(), expected)
    logged = counts.copy()
    logged.data = np.log1p(logged.data / 7.0)       # log-normalised to another total
    assert np.allclose(normalise(logged, MatrixValues("log-normalised")).toarray(), expected)
    tpm = sp.csr_matrix(counts.toarray() / counts.toarray().sum(1, keepdims=True) * 1e6)
    assert np.allclose(normalise(tpm, MatrixValues("normalised", 1e6)).toarray(), expected)
