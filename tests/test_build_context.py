"""build-context on scanpy's PBMC set, synthetic CELLxGENE-schema files and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures import assert_user_error

from cellpuzzle_cli.build_context import ContextSettings
from cellpuzzle_cli.config import layer_settings
from cellpuzzle_cli.synthetic import SyntheticSpec, write_synthetic_h5ad

PBMC = Path(__import__("scanpy").__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"
KANG = Path(__file__).resolve().parents[2] / "shared" / "data" / "kang2018_pbmc.h5ad"


def read_table(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def expected_top(row: np.ndarray, names: np.ndarray, k: int) -> list[str]:
    """Reference: a stable argsort of the whole row, positives only."""
    order = np.argsort(-row, kind="stable")
    order = order[row[order] > 0][:k]
    return [str(n) for n in names[order]]


def dense_rows(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """Three donors, nucleus rows, NaN cell types, SYMBOL_ENSG names."""
    path = tmp_path_factory.mktemp("synth") / "atlas.h5ad"
    return write_synthetic_h5ad(path, SyntheticSpec(n_cells=400, n_genes=300, nnz_per_cell=50,
                                                    n_donors=3, nan_type_fraction=0.05,
                                                    nucleus_fraction=0.05, suffixed_fraction=0.3,
                                                    block_cells=150, seed=3))


# -- real data ----------------------------------------------------------------------------
def test_pbmc_ranks_raw_x_and_matches_numpy(cli, tmp_path):
    import anndata

    out = tmp_path / "cells"
    result = cli("build-context", PBMC, "-o", out, "--cell-type-col", "bulk_labels",
                 "--top-genes", "20", "--workers", "1")
    assert result.code == 0, result.output
    assert "raw.X" in result.output and "negative values" in result.output
    assert "No 'donor_id' column" in result.output

    table = read_table(out / "10x_pbmc68k_reduced.parquet").to_pylist()
    adata = anndata.read_h5ad(PBMC)
    assert adata.X.min() < 0          # the reason raw.X must be used
    assert len(table) == adata.n_obs == 700
    raw = dense_rows(adata.raw.X)
    names = np.asarray(adata.raw.var_names)
    for i in (0, 1, 250, 699):
        row = table[i]
        assert row["cell_id"] == adata.obs_names[i]
        assert row["cell_type"] == adata.obs["bulk_labels"].iloc[i]
        assert row["top_genes"] == expected_top(raw[i], names, 20)
    assert {r["donor_id"] for r in table} == {"10x_pbmc68k_reduced"}
    assert all(r["batch_id"] is None for r in table)
    assert "peripheral blood mononuclear cells" in table[0]["context"]   # shipped YAML rule

    saved = layer_settings(ContextSettings, out / "build-context.yaml")  # reloads as --config
    assert saved == ContextSettings(top_genes=20, cell_type_col="bulk_labels")
    entry = json.loads(cli.manifest.read_text())["entries"][-1]
    assert entry["command"] == "build-context"
    assert entry["summary"]["files"][0]["matrix"] == "raw.X"
    assert entry["params"]["cell_type_col"] == "bulk_labels"
    assert entry["outputs"][0]["name"] == "cells" and entry["outputs"][0]["nfiles"] == 3


@pytest.mark.skipif(not KANG.exists(), reason="shared/data/kang2018_pbmc.h5ad is not present")
def test_kang_donors_and_feature_name_symbols(tmp_path):
    from cellpuzzle_cli.build_context import ContextSettings, build_context

    result = build_context([KANG], tmp_path / "cells", ContextSettings(max_cells=2000, workers=1))
    report = result.files[0]
    assert report.donors == 8 and report.cell_types == 8
    assert report.genes_from == "var.feature_name"
    table = read_table(tmp_path / "cells" / "kang2018_pbmc.parquet").to_pydict()
    genes = {g for cell in table["top_genes"] for g in cell}
    assert "MALAT1" in genes and not any(g.startswith("ENSG") for g in genes)
    assert len(set(table["donor_id"])) == 8


# -- synthetic CELLxGENE-schema files -----------------------------------------------------
def test_synthetic_file_reads_with_anndata(synth):
    import anndata

    adata = anndata.read_h5ad(synth)
    assert adata.shape == (400, 300)
    assert adata.X.format == "csr" and adata.X.has_sorted_indices
    assert 40 < adata.X.nnz / adata.n_obs < 60
    assert adata.obs["cell_type"].dtype == "category"
    assert (adata.obs["suspension_type"] == "nucleus").sum() > 0
    assert adata.obs["cell_type"].isna().sum() > 0
    assert adata.var["feature_name"].str.contains("_ENSG").sum() > 0


def test_cellxgene_filters_symbols_donors_and_context(cli, synth, tmp_path):
    import anndata

    out = tmp_path / "cells"
    result = cli("build-context", synth, "-o", out, "--top-genes", "10", "--workers", "1")
    assert result.code == 0, result.output
    adata = anndata.read_h5ad(synth)
    obs = adata.obs
    nucleus = obs["suspension_type"] != "cell"
    nan_type = obs["cell_type"].isna() & ~nucleus
    table = read_table(out / "atlas.parquet").to_pylist()
    assert len(table) == int((~nucleus & ~obs["cell_type"].isna()).sum())
    kept_ids = {r["cell_id"] for r in table}
    assert not kept_ids & set(obs.index[nucleus])
    report = json.loads(cli.manifest.read_text())["entries"][-1]["summary"]["files"][0]
    assert report["dropped_suspension"] == int(nucleus.sum())
    assert report["dropped_nan_type"] == int(nan_type.sum())
    assert report["donors"] == 3

    # symbols: suffixes stripped, and ranking equals a direct argsort of each row
    stripped = np.asarray([n.split("_ENSG")[0] for n in adata.var["feature_name"]])
    x = dense_rows(adata.X)
    position = {c: i for i, c in enumerate(obs.index)}
    for row in table[::37]:
        assert row["top_genes"] == expected_top(x[position[row["cell_id"]]], stripped, 10)
    assert not any("_ENSG" in g for r in table for g in r["top_genes"])

    # context per donor, from the donor's metadata, rendered by the shipped YAML
    by_donor = {r["donor_id"]: r for r in table}
    assert set(by_donor) == set(obs["donor_id"].astype(str))
    first = by_donor["donor_1"]
    donor_obs = obs[obs["donor_id"] == "donor_1"].iloc[0]
    assert first["sex"] == donor_obs["sex"]
    assert f"The donor is {donor_obs['sex']}." in first["context"]
    assert first["tissue"] == donor_obs["tissue"]
    contexts = {r["donor_id"]: r["context"] for r in table}
    assert len(set(contexts.values())) == 3


def test_folder_tree_is_mirrored(cli, tmp_path):
    root = tmp_path / "data"
    spec = SyntheticSpec(n_cells=60, n_genes=80, nnz_per_cell=15)
    write_synthetic_h5ad(root / "lung.h5ad", spec)
    write_synthetic_h5ad(root / "study2" / "blood.h5ad", spec)
    (root / "notes.txt").write_text("not data")
    out = tmp_path / "cells"
    result = cli("build-context", root, "-o", out, "--workers", "1")
    assert result.code == 0, result.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert files == ["lung.parquet", "study2/blood.parquet"]
    assert set(read_table(out / "study2" / "blood.parquet").column("dataset").to_pylist()) == {
        "study2/blood"}


def test_max_cells_is_seeded_and_workers_do_not_change_bytes(synth, tmp_path):
    from cellpuzzle_cli.build_context import ContextSettings, build_context

    def run(name: str, seed: int, workers: int = 1) -> bytes:
        cfg = ContextSettings(max_cells=100, seed=seed, workers=workers, chunk_cells=32)
        result = build_context([synth], tmp_path / name, cfg)
        assert result.files[0].cells_kept == 100
        assert result.files[0].dropped_subsample > 0
        return (tmp_path / name / "atlas.parquet").read_bytes()

    first = run("a", seed=7)
    assert run("b", seed=7) == first
    assert run("c", seed=8) != first
    assert run("d", seed=7, workers=2) == first      # worker processes, same bytes


def test_dense_x_gives_the_same_tables(tmp_path):
    from cellpuzzle_cli.build_context import ContextSettings, build_context

    spec = SyntheticSpec(n_cells=120, n_genes=90, nnz_per_cell=20, seed=5)
    write_synthetic_h5ad(tmp_path / "in" / "sparse.h5ad", spec)
    write_synthetic_h5ad(tmp_path / "in2" / "sparse.h5ad", SyntheticSpec(**{**spec.__dict__,
                                                                          "dense": True}))
    build_context([tmp_path / "in"], tmp_path / "a", ContextSettings(workers=1))
    build_context([tmp_path / "in2"], tmp_path / "b", ContextSettings(workers=1, chunk_cells=50))
    a = read_table(tmp_path / "a" / "sparse.parquet")
    b = read_table(tmp_path / "b" / "sparse.parquet")
    assert a.column("top_genes").to_pylist() == b.column("top_genes").to_pylist()
    assert a.num_rows == b.num_rows > 100


def test_counts_layer_when_x_is_scaled_and_no_raw(tmp_path):
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    from cellpuzzle_cli.build_context import ContextSettings, build_context

    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (30, 12)).astype(np.float32)
    scaled = (counts - counts.mean(0)) / (counts.std(0) + 1)
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T", "B"] * 15),
                        "donor_id": pd.Categorical(["d1"] * 30)},
                       index=[f"c{i}" for i in range(30)])
    var = pd.DataFrame(index=[f"G{i}" for i in range(12)])
    adata = anndata.AnnData(scaled, obs=obs, var=var, layers={"counts": sp.csr_matrix(counts)})
    adata.write_h5ad(tmp_path / "scaled.h5ad")
    result = build_context([tmp_path / "scaled.h5ad"], tmp_path / "out",
                           ContextSettings(top_genes=5, workers=1))
    assert result.files[0].matrix == "layers['counts']"
    table = read_table(tmp_path / "out" / "scaled.parquet").to_pylist()
    names = np.asarray(var.index)
    assert [r["top_genes"] for r in table] == [expected_top(counts[i], names, 5) for i in range(30)]
    assert "No donor or sample metadata" in table[0]["context"]      # fallback sentence


def test_csc_matrix_is_read_whole_with_a_warning(tmp_path):
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    from cellpuzzle_cli.build_context import ContextSettings, build_context

    rng = np.random.default_rng(2)
    counts = (rng.poisson(0.7, (40, 25)) * rng.integers(1, 4, (40, 25))).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T", "B", "NK", "Mono"] * 10)},
                       index=[f"c{i}" for i in range(40)])
    var = pd.DataFrame(index=[f"G{i}" for i in range(25)])
    anndata.AnnData(sp.csc_matrix(counts), obs=obs, var=var).write_h5ad(tmp_path / "csc.h5ad")
    result = build_context([tmp_path / "csc.h5ad"], tmp_path / "out",
                           ContextSettings(top_genes=6, workers=2, chunk_cells=16))
    assert any("CSC" in w for w in result.warnings)
    table = read_table(tmp_path / "out" / "csc.parquet").column("top_genes").to_pylist()
    assert table == [expected_top(counts[i], np.asarray(var.index), 6) for i in range(40)]


def test_ensembl_only_names_warn(cli, tmp_path):
    import anndata
    import pandas as pd

    x = np.eye(6, dtype=np.float32) + 1
    obs = pd.DataFrame({"cell_type": pd.Categorical(list("ABABAB"))}, index=list("abcdef"))
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(6)])
    anndata.AnnData(x, obs=obs, var=var).write_h5ad(tmp_path / "ids.h5ad")
    result = cli("build-context", tmp_path / "ids.h5ad", "-o", tmp_path / "out", "--workers", "1")
    assert result.code == 0, result.output
    assert "Ensembl IDs only" in " ".join(result.output.split())


def test_custom_context_config(cli, synth, tmp_path):
    config = tmp_path / "fields.yaml"
    config.write_text("fields:\n  - column: sex\n    sentence: 'Sex of the donor: {value}.'\n"
                      "    values: {female: F}\n"
                      "datasets:\n  - match: 'atlas'\n    text: 'A synthetic atlas.'\n")
    out = tmp_path / "cells"
    result = cli("build-context", synth, "-o", out, "--context-config", config, "--workers", "1")
    assert result.code == 0, result.output
    table = read_table(out / "atlas.parquet")
    assert table.column_names[7:] == ["sex"]
    contexts = set(table.column("context").to_pylist())
    assert "A synthetic atlas. Sex of the donor: F." in contexts


def test_shipped_context_config_loads():
    from cellpuzzle_cli.build_context import load_context_fields

    fields = load_context_fields()
    assert [f.column for f in fields.fields][:5] == ["sex", "development_stage",
                                                     "self_reported_ethnicity", "tissue",
                                                     "disease"]
    texts, _ = fields.for_dataset("kang2018_pbmc")
    assert texts and "lupus" in texts[0]


def test_topk_matches_reference_with_ties_nan_and_negatives():
    import scipy.sparse as sp

    from cellpuzzle_cli.build_context import topk_csr, topk_dense

    rng = np.random.default_rng(1)
    for trial in range(120):
        n, g, k = int(rng.integers(1, 40)), int(rng.integers(1, 300)), int(rng.integers(1, 70))
        dtype = (np.float32, np.float64, np.int32, np.int64)[trial % 4]
        dense = (rng.integers(-3, 9, (n, g)) * (rng.random((n, g)) < rng.random())).astype(dtype)
        if dense.dtype.kind == "f":
            dense[rng.random((n, g)) < 0.01] = np.nan
        m = sp.csr_matrix(dense)
        lengths, genes = topk_csr(m.indptr.astype(np.int64), m.indices, m.data, k)
        clean = np.nan_to_num(dense, nan=0)
        expected = [expected_top(row, np.arange(g), k) for row in clean]
        got = [[str(x) for x in part] for part in np.split(genes, np.cumsum(lengths)[:-1])]
        assert got == expected, (trial, n, g, k, dtype)
        d_lengths, d_genes = topk_dense(dense, k)
        assert np.array_equal(d_lengths, lengths) and np.array_equal(d_genes, genes)


def test_topk_threshold_guess_is_checked(monkeypatch):
    """Rows built so that sampling every 8th value overestimates the k-th largest."""
    import scipy.sparse as sp

    from cellpuzzle_cli.build_context import topk as context
    from cellpuzzle_cli.build_context import topk_csr

    redone = []
    exact = context._exact_thresholds
    monkeypatch.setattr(context, "_exact_thresholds",
                        lambda *a: redone.append(a[3].tolist()) or exact(*a))

    rng = np.random.default_rng(4)
    dense = rng.integers(1, 4, (6, 2000)).astype(np.float32)
    dense[:3, ::8] = 100 + rng.random((3, 250))      # the sample sees only the big values
    dense[3] = 0
    dense[4] = 0
    dense[4, 100:130] = 5                             # fewer positives than k
    m = sp.csr_matrix(dense)
    lengths, genes = topk_csr(m.indptr.astype(np.int64), m.indices, m.data, 50)
    got = np.split(genes, np.cumsum(lengths)[:-1])
    for row, part in zip(dense, got):
        assert [str(g) for g in part] == expected_top(row, np.arange(2000), 50)
    assert list(lengths) == [50, 50, 50, 0, 30, 50]
    assert redone == [[0, 1, 2]]                      # the bad guesses were caught and redone


@pytest.mark.parametrize("inflater", ["isal", "zlib"])
def test_row_reader_matches_anndata(synth, inflater, monkeypatch):
    import zlib

    import anndata

    from cellpuzzle_cli.build_context import rows as context

    if inflater == "zlib":
        monkeypatch.setattr(context, "_inflater",
                            lambda: lambda raw, size: zlib.decompress(raw, bufsize=size))
    x = anndata.read_h5ad(synth).X
    spec = context.MatrixSpec(str(synth), "X", "csr", x.shape, "X")
    rows = np.array([0, 1, 2, 150, 151, 399])           # runs far apart and a gap to skip
    try:
        indptr, indices, values = context._read_csr_rows(spec, rows)
        assert context._READERS[(str(synth), "X/data")] is not None   # the raw-chunk path ran
    finally:
        context.close_cached_files()
    sub = x[rows]
    assert np.array_equal(indptr, sub.indptr)
    assert np.array_equal(indices, sub.indices) and np.array_equal(values, sub.data)


# -- bad input ----------------------------------------------------------------------------
def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def test_nonexistent_path(cli, tmp_path):
    out = tmp_path / "cells"
    assert_user_error(cli("build-context", tmp_path / "nope.h5ad", "-o", out), "does not exist")
    _nothing_written(out)


def test_not_hdf5(cli, tmp_path):
    bad = tmp_path / "table.h5ad"
    bad.write_text("cell,type\n1,T\n")
    out = tmp_path / "cells"
    assert_user_error(cli("build-context", bad, "-o", out), "not an HDF5 file")
    _nothing_written(out)


def test_truncated_h5ad(cli, synth, tmp_path):
    data = synth.read_bytes()
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "cells"
    assert_user_error(cli("build-context", cut, "-o", out, "--workers", "1"), "truncated")
    _nothing_written(out)


def test_missing_cell_type_column_lists_columns(cli, synth, tmp_path):
    out = tmp_path / "cells"
    result = cli("build-context", synth, "-o", out, "--cell-type-col", "author_label")
    assert_user_error(result, "no column 'author_label'", "donor_id", "suspension_type",
                      "--cell-type-col")
    _nothing_written(out)


def test_zero_cells_after_filtering(cli, tmp_path):
    path = write_synthetic_h5ad(tmp_path / "nuclei.h5ad",
                                SyntheticSpec(n_cells=30, n_genes=40, nnz_per_cell=10,
                                              nucleus_fraction=1.0))
    out = tmp_path / "cells"
    assert_user_error(cli("build-context", path, "-o", out), "no cells left", "30 with")
    _nothing_written(out)


def test_output_folder_with_results_is_refused(cli, synth, tmp_path):
    out = tmp_path / "cells"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"x")
    assert_user_error(cli("build-context", synth, "-o", out), "already holds results",
                      "--overwrite")
    assert [p.name for p in out.iterdir()] == ["old.parquet"]
    result = cli("build-context", synth, "-o", out, "--overwrite", "--workers", "1")
    assert result.code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [".cellpuzzle-run.json", "atlas.parquet",
                                                     "build-context.yaml"]


def test_bad_context_config_key(cli, synth, tmp_path):
    config = tmp_path / "fields.yaml"
    config.write_text("fields:\n  - column: sex\n    sentense: 'typo {value}'\n")
    assert_user_error(cli("build-context", synth, "-o", tmp_path / "o", "--context-config",
                          config), "needs `column` and `sentence`")


def test_help_has_an_example(cli):
    result = cli("build-context", "--help")
    assert result.code == 0
    assert "cellpuzzle build-context data/ -o cells/" in " ".join(result.output.split())

