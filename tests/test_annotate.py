"""annotate's service on scanpy's PBMC set split into reference and query, and bad input."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from cellpuzzle_cli.annotate import AnnotateSettings, run_annotate
from cellpuzzle_cli.errors import UserError

PBMC = Path(__import__("scanpy").__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"
LABELS = "bulk_labels"
B_CELLS = "CD19+ B"


@pytest.fixture(scope="module")
def pbmc(tmp_path_factory) -> dict:
    """Half of the 700 cells as a labelled reference, the other half as a query without the
    label column (X scaled, .raw log-normalised, as scanpy ships it)."""
    import anndata

    folder = tmp_path_factory.mktemp("pbmc")
    adata = anndata.read_h5ad(PBMC)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    ref, query = adata[np.sort(order[:350])].copy(), adata[np.sort(order[350:])].copy()
    truth = query.obs[LABELS].astype(str).to_numpy()
    query.obs = query.obs.drop(columns=[LABELS])
    ref.write_h5ad(folder / "reference.h5ad")
    query.write_h5ad(folder / "query.h5ad")
    return {"dir": folder, "ref": folder / "reference.h5ad", "query": folder / "query.h5ad",
            "truth": truth}


def settings(**kw) -> AnnotateSettings:
    return AnnotateSettings(cell_type_col=LABELS, plot=kw.pop("plot", False), **kw)


def annotated(out: Path, name: str = "query.h5ad"):
    import anndata

    return anndata.read_h5ad(out / name)


def labels_of(out: Path) -> tuple[np.ndarray, np.ndarray]:
    obs = annotated(out).obs
    return (obs["cellpuzzle_label"].astype(str).to_numpy(),
            obs["cellpuzzle_confidence"].to_numpy())


@pytest.fixture(scope="module")
def default_run(pbmc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "default"
    run_annotate(pbmc["query"], pbmc["ref"], out, settings())
    return out


# -- what a biologist checks ----------------------------------------------------------------
def test_agreement_with_hidden_labels_well_above_chance(pbmc, default_run):
    pred, conf = labels_of(default_run)
    agreement = float(np.mean(pred == pbmc["truth"]))
    assert agreement > 0.65, agreement      # 10 types: chance 0.1; measured 0.77
    assert ((conf >= 0) & (conf <= 1)).all()


def test_confidence_above_median_is_right_more_often(pbmc, default_run):
    pred, conf = labels_of(default_run)
    right = pred == pbmc["truth"]
    above = conf > np.median(conf)
    assert right[above].mean() > right[~above].mean() + 0.1


def same(a, b) -> bool:
    """Equal values, NaN equal to NaN, text compared as text."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "O" or b.dtype.kind == "O" or a.dtype.names:
        return a.shape == b.shape and a.tolist() == b.tolist()
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_annotated_file_holds_everything_the_input_held(pbmc, default_run):
    """Every dataset and attribute of the input is in the output, unchanged; only the three
    obs columns, obs' column order and uns['cellpuzzle'] are new."""
    new = {"obs/cellpuzzle_label", "obs/cellpuzzle_confidence", "obs/cellpuzzle_cluster",
           "uns/cellpuzzle"}
    seen = []
    with h5py.File(pbmc["query"], "r") as src, h5py.File(default_run / "query.h5ad", "r") as dst:
        def compare(name: str, node) -> None:
            seen.append(name)
            assert name in dst, name
            other = dst[name]
            for key, value in node.attrs.items():
                if (name, key) != ("obs", "column-order"):
                    assert same(other.attrs[key], value), (name, key)
            if isinstance(node, h5py.Dataset):
                assert node.dtype == other.dtype and node.shape == other.shape, name
                assert same(node[()], other[()]), name

        src.visititems(compare)
        order = [str(c) for c in dst["obs"].attrs["column-order"]]
        before = [str(c) for c in src["obs"].attrs["column-order"]]
        assert order == before + ["cellpuzzle_label", "cellpuzzle_confidence",
                                  "cellpuzzle_cluster"]
        added = []
        dst.visit(lambda name: added.append(name) if name not in seen else None)
        assert {a.split("/")[0] + "/" + a.split("/")[1] for a in added} == new
    assert {"X", "raw/X", "obsm/X_umap", "obsm/X_pca", "varm/PCs", "obsp/distances",
            "uns/louvain_colors"} <= set(seen)


def test_annotated_file_opens_in_scanpy_with_the_new_columns(pbmc, default_run):
    import anndata
    import scanpy as sc

    before, after = anndata.read_h5ad(pbmc["query"]), sc.read_h5ad(default_run / "query.h5ad")
    assert list(after.obs_names) == list(before.obs_names)
    assert after.obs["cellpuzzle_label"].dtype == "category"
    assert after.obs["cellpuzzle_cluster"].dtype == "category"
    assert after.obs["cellpuzzle_confidence"].dtype == np.float32
    for col in before.obs.columns:
        assert after.obs[col].equals(before.obs[col]), col
    meta = after.uns["cellpuzzle"]
    assert meta["backend"] == "baseline" and int(meta["seed"]) == 0
    assert set(meta["candidates"]) == set(np.unique(anndata.read_h5ad(pbmc["ref"]).obs[LABELS]))
    assert "version" in meta and "model" in meta and meta["reference"] == str(pbmc["ref"])
    clusters = (default_run / "clusters.tsv").read_text().splitlines()
    assert clusters[0].split("\t")[:4] == ["file", "cluster", "cells", "label"]
    assert len(clusters) - 1 == after.obs["cellpuzzle_cluster"].cat.categories.size
    assert sum(int(line.split("\t")[2]) for line in clusters[1:]) == after.n_obs


def test_type_missing_from_candidates_comes_out_unassigned(pbmc, tmp_path):
    import anndata

    types = sorted(set(np.unique(anndata.read_h5ad(pbmc["ref"]).obs[LABELS])) - {B_CELLS})
    run_annotate(pbmc["query"], pbmc["ref"], tmp_path / "out", settings(candidates=types))
    pred, conf = labels_of(tmp_path / "out")
    b = pbmc["truth"] == B_CELLS
    assert b.sum() >= 20
    assert np.mean(pred[b] == "unassigned") > 0.8
    assert np.median(conf[b]) < np.median(conf[~b]) - 0.3
    assert np.mean(pred[~b] == "unassigned") < 0.1


def test_same_inputs_and_seed_give_identical_bytes(pbmc, tmp_path):
    for name in ("a", "b"):
        run_annotate(pbmc["query"], pbmc["ref"], tmp_path / name, settings(plot=True))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["annotate.png", "annotate.yaml", "clusters.tsv", "query.h5ad"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_user_clusters_give_one_label_per_cluster(pbmc, tmp_path):
    result = run_annotate(pbmc["query"], pbmc["ref"], tmp_path / "out",
                          settings(cluster_col="louvain"))
    obs = annotated(tmp_path / "out").obs
    per_cluster = obs.groupby("louvain", observed=True)["cellpuzzle_label"].nunique()
    assert (per_cluster == 1).all()
    assert list(obs["cellpuzzle_cluster"].astype(str)) == list(obs["louvain"].astype(str))
    assert result.label_by == "cluster" and "obs['louvain']" in result.files[0].clustering


def test_one_to_one_gives_more_candidates_a_cluster(pbmc, tmp_path):
    """11 clusters, 10 types: the assignment gives each type its own cluster (a cluster whose
    assigned type fits worse than "none of them" stays unassigned), where plain argmax gives
    several clusters the same type and leaves types out."""
    import anndata

    types = sorted(np.unique(anndata.read_h5ad(pbmc["ref"]).obs[LABELS]))
    for name, one_to_one in (("free", False), ("once", True)):
        run_annotate(pbmc["query"], pbmc["ref"], tmp_path / name,
                     settings(cluster_col="louvain", one_to_one=one_to_one))
    labels = {name: [line.split("\t")[3] for line in
                     (tmp_path / name / "clusters.tsv").read_text().splitlines()[1:]]
              for name in ("free", "once")}
    used = {name: set(found) - {"unassigned"} for name, found in labels.items()}
    assert used["once"] <= set(types) and len(used["once"]) >= len(types) - 1
    assert len(used["free"]) < len(used["once"])


def test_large_query_is_subsampled_and_joined(pbmc, tmp_path):
    result = run_annotate(pbmc["query"], pbmc["ref"], tmp_path / "out",
                          settings(max_cells_in_memory=150))
    note = " ".join(result.files[0].notes)
    assert "150 cells (seeded) were clustered" in note and "nearest centroid" in note
    pred, _ = labels_of(tmp_path / "out")
    assert np.mean(pred == pbmc["truth"]) > 0.65
    assert annotated(tmp_path / "out").obs["cellpuzzle_cluster"].notna().all()


def test_celltypist_backend_and_a_saved_model_file(pbmc, tmp_path):
    from cellpuzzle_cli.annotate.celltypist_backend import quiet_celltypist

    run_annotate(pbmc["query"], pbmc["ref"], tmp_path / "trained", settings(backend="celltypist"))
    pred, _ = labels_of(tmp_path / "trained")
    assert np.mean(pred == pbmc["truth"]) > 0.6

    import anndata

    ref = anndata.read_h5ad(pbmc["ref"]).raw.to_adata()
    model = quiet_celltypist().train(ref, labels=anndata.read_h5ad(pbmc["ref"]).obs[LABELS],
                                     n_jobs=1, check_expression=False)
    model.write(str(tmp_path / "model.pkl"))
    run_annotate(pbmc["query"], None, tmp_path / "file",
                 settings(backend="celltypist", celltypist_model=tmp_path / "model.pkl"))
    pred, _ = labels_of(tmp_path / "file")
    assert np.mean(pred == pbmc["truth"]) > 0.6


def test_build_context_folder_as_reference(pbmc, tmp_path):
    from cellpuzzle_cli.build_context import ContextSettings, build_context

    build_context([pbmc["ref"]], tmp_path / "cells",
                  ContextSettings(cell_type_col=LABELS, top_genes=100, workers=1))
    result = run_annotate(pbmc["query"], tmp_path / "cells", tmp_path / "out", settings())
    assert any("100 genes per cell" in w for w in result.warnings)
    pred, _ = labels_of(tmp_path / "out")
    assert np.mean(pred == pbmc["truth"]) > 0.6


def test_a_folder_of_queries_and_progress(pbmc, tmp_path):
    import anndata

    folder = tmp_path / "lab"
    (folder / "day2").mkdir(parents=True)
    query = anndata.read_h5ad(pbmc["query"])
    query[:150].copy().write_h5ad(folder / "day1.h5ad")
    query[150:].copy().write_h5ad(folder / "day2" / "sample.h5ad")
    calls = []
    result = run_annotate(folder, pbmc["ref"], tmp_path / "out", settings(plot=True),
                          progress=lambda advance=1, total=None, description=None:
                          calls.append((advance, total, description)))
    assert [f.output for f in result.files] == ["day1.h5ad", "day2/sample.h5ad"]
    assert annotated(tmp_path / "out", "day2/sample.h5ad").n_obs == 200
    rows = (tmp_path / "out" / "clusters.tsv").read_text().splitlines()[1:]
    assert {line.split("\t")[0] for line in rows} == {"day1.h5ad", "day2/sample.h5ad"}
    assert result.summary()["files"][1]["cells"] == 200 and "seconds" not in \
        result.summary()["files"][0]
    assert any(d and d.startswith("score") for _, _, d in calls)


def test_pre_0_7_file_is_rewritten_whole_and_keeps_its_label_column(pbmc, tmp_path):
    """scanpy's own PBMC file has the old layout (obs as one table, raw.X) and still holds its
    label column, which annotate ignores and keeps."""
    import anndata

    result = run_annotate(PBMC, pbmc["ref"], tmp_path / "out", settings())
    before, after = anndata.read_h5ad(PBMC), annotated(tmp_path / "out", PBMC.name)
    assert result.files[0].cells == 700
    assert after.obs[LABELS].equals(before.obs[LABELS])
    assert np.array_equal(after.X, before.X) and (after.raw.X != before.raw.X).nnz == 0
    assert "cellpuzzle_label" in after.obs and "cellpuzzle" in after.uns


def test_celltypist_from_a_build_context_folder_needs_its_h5ad_files(pbmc, tmp_path):
    from cellpuzzle_cli.build_context import ContextSettings, build_context

    build_context([pbmc["ref"]], tmp_path / "cells", ContextSettings(cell_type_col=LABELS,
                                                                    workers=1))
    refused(pbmc["query"], tmp_path / "cells", tmp_path / "no_files", "files it was built from",
            backend="celltypist")
    run_annotate(pbmc["query"], tmp_path / "cells", tmp_path / "out",
                 settings(backend="celltypist"), reference_h5ads=[pbmc["ref"]])
    pred, _ = labels_of(tmp_path / "out")
    assert np.mean(pred == pbmc["truth"]) > 0.6


# -- bad input: one paragraph, nothing written ----------------------------------------------
def refused(query: Path, ref: Path | None, out: Path, *fragments: str, **kw) -> None:
    with pytest.raises(UserError) as info:
        run_annotate(query, ref, out, settings(**kw))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def write_variant(src: Path, dst: Path, edit) -> Path:
    import anndata

    adata = anndata.read_h5ad(src)
    edited = edit(adata)
    (adata if edited is None else edited).write_h5ad(dst)
    return dst


def test_no_shared_gene_names_both_namings(pbmc, tmp_path):
    def ensembl(adata):
        raw = adata.raw.to_adata()       # log-normalised X, genes named by Ensembl ID only
        raw.var_names = [f"ENSG{i:011d}" for i in range(raw.n_vars)]
        return raw

    query = write_variant(pbmc["query"], tmp_path / "ids.h5ad", ensembl)
    refused(query, pbmc["ref"], tmp_path / "out", "share no gene", "765 genes (Ensembl IDs",
            "765 (gene symbols", "--gene-col")


def test_reference_with_one_type(pbmc, tmp_path):
    def one(adata):
        adata.obs[LABELS] = "T cell"

    ref = write_variant(pbmc["ref"], tmp_path / "one.h5ad", one)
    refused(pbmc["query"], ref, tmp_path / "out", "1 cell type", "T cell", "--cell-type-col")


def test_empty_query(pbmc, tmp_path):
    query = write_variant(pbmc["query"], tmp_path / "empty.h5ad", lambda a: a[:0].copy())
    refused(query, pbmc["ref"], tmp_path / "out", "holds no cells")


def test_scaled_query_without_raw(pbmc, tmp_path):
    def no_raw(adata):
        del adata.raw

    query = write_variant(pbmc["query"], tmp_path / "scaled.h5ad", no_raw)
    refused(query, pbmc["ref"], tmp_path / "out", "negative values (scaled data)", ".raw")


def test_candidate_the_reference_lacks(pbmc, tmp_path):
    refused(pbmc["query"], pbmc["ref"], tmp_path / "out", "'Hepatocyte' is not a cell type",
            "CD19+ B", candidates=["CD19+ B", "Hepatocyte"])


def test_existing_output_refused_unless_overwrite(pbmc, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    with pytest.raises(UserError, match="already holds results"):
        run_annotate(pbmc["query"], pbmc["ref"], out, settings())
    assert (out / "keep.txt").read_text() == "earlier results"
    run_annotate(pbmc["query"], pbmc["ref"], out, settings(), overwrite=True)
    assert (out / "query.h5ad").exists() and not (out / "keep.txt").exists()


class _Exploit:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.target),)


def test_celltypist_model_file_that_is_not_one(pbmc, tmp_path):
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    refused(pbmc["query"], None, tmp_path / "out", "is not a CellTypist model file",
            backend="celltypist", celltypist_model=junk)
    text = tmp_path / "notes.pkl"
    text.write_text("not a pickle at all")
    refused(pbmc["query"], None, tmp_path / "out", "is not a CellTypist model file",
            backend="celltypist", celltypist_model=text)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"Model": _Exploit(tmp_path / "pwned")}))
    refused(pbmc["query"], None, tmp_path / "out", "could run code, so it was refused",
            backend="celltypist", celltypist_model=evil)
    assert not (tmp_path / "pwned").exists()


def test_settings_are_checked():
    from cellpuzzle_cli.config import check_settings

    with pytest.raises(UserError, match="one_to_one"):
        check_settings(AnnotateSettings(one_to_one=True, label_by="cell"))
    with pytest.raises(UserError, match="listed twice"):
        check_settings(AnnotateSettings(candidates=["B cell", "b cell"]))
    with pytest.raises(UserError, match="min_confidence"):
        check_settings(AnnotateSettings(min_confidence=1.5))


# -- the marker model's vectorised paths ----------------------------------------------------
def test_marker_stats_from_cells_and_vectorised_scores_match_the_puzzle_path():
    from cellpuzzle_cli.markers import MarkerStats

    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(80)]
    cells = [([genes[g] for g in rng.choice(80, rng.integers(1, 40), replace=False)],
              f"type{t}") for t in rng.integers(0, 4, 120)]
    stats = MarkerStats.fit_cells(cells, depths=(5, 15, 40))
    index = {g: j for j, g in enumerate(stats.genes)}
    query = [[genes[g] for g in rng.choice(80, 30, replace=False)] + ["UNSEEN"] for _ in range(9)]
    lengths = np.asarray([len(q) for q in query])
    flat = np.asarray([index.get(g, -1) for q in query for g in q])
    vectorised = stats.score_ranked(lengths, flat)
    assert np.allclose(vectorised[:, :-1], stats.score_matrix(query, stats.types), atol=1e-3)
