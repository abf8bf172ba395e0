"""Synthetic CELLxGENE-schema `.h5ad` files for tests and benchmarks.

Real CELLxGENE downloads are gigabytes; tests need something tiny with the same shape, and the
benchmark needs something huge without holding it in memory. The generator writes anndata's
on-disk layout directly with h5py (CSR `data`/`indices`/`indptr`, gzip like CELLxGENE), one block
of cells at a time, so 100,000 x 30,000 with ~2,000 non-zeros per cell needs only one block in
memory. Expression is count-like: every cell type has marker genes, so top-gene lists differ by
type the way they do in real data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEXES = ("female", "male")
STAGES = ("25-year-old human stage", "42-year-old human stage", "67-year-old human stage",
          "human adult stage")
ETHNICITIES = ("European", "African American", "East Asian", "Hispanic or Latin American",
               "unknown")
TISSUES = ("blood", "lung", "spleen")
DISEASES = ("normal", "COVID-19", "systemic lupus erythematosus")
CELL_TYPES = ("B cell", "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell",
              "natural killer cell", "classical monocyte", "non-classical monocyte",
              "plasmacytoid dendritic cell", "platelet", "erythrocyte", "mast cell",
              "hematopoietic stem cell", "conventional dendritic cell")
MARKERS_PER_TYPE = 25
# CELLxGENE's `<field>_ontology_term_id` values for the labels above (same order).
TERM_IDS = {
    "cell_type": ("CL:0000236", "CL:0000624", "CL:0000625", "CL:0000623", "CL:0000860",
                  "CL:0000875", "CL:0000784", "CL:0000233", "CL:0000232", "CL:0000097",
                  "CL:0000037", "CL:0000990"),
    "sex": ("PATO:0000383", "PATO:0000384"),
    "development_stage": ("HsapDv:0000119", "HsapDv:0000136", "HsapDv:0000161",
                          "HsapDv:0000087"),
    "self_reported_ethnicity": ("HANCESTRO:0005", "HANCESTRO:0568", "HANCESTRO:0849",
                                "HANCESTRO:0612", "unknown"),
    "tissue": ("UBERON:0000178", "UBERON:0002048", "UBERON:0002106"),
    "disease": ("PATO:0000461", "MONDO:0100096", "MONDO:0007915"),
}


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; every random choice follows `seed`."""

    n_cells: int = 500
    n_genes: int = 400
    nnz_per_cell: int = 60
    n_donors: int = 3
    n_cell_types: int = 6
    seed: int = 0
    nucleus_fraction: float = 0.03   # rows with suspension_type == "nucleus"
    nan_type_fraction: float = 0.0   # rows whose cell_type is missing (NaN)
    suffixed_fraction: float = 0.1   # feature_name written as SYMBOL_ENSG... (CELLxGENE does this)
    dense: bool = False              # X as a dense 2-D dataset instead of CSR
    term_ids: bool = False           # also write CELLxGENE's *_ontology_term_id columns
    labels: bool = True              # False: only the ID columns (a file before curation)
    block_cells: int = 2000          # cells generated and written per step


def ensembl_id(i: int) -> str:
    return f"ENSG{i + 1:011d}"


def gene_symbols(n_genes: int) -> list[str]:
    return [f"GENE{i + 1}" for i in range(n_genes)]


def write_synthetic_h5ad(path: Path | str, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a CELLxGENE-like `.h5ad` to `path` (atomically: a temp file renamed at the end)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    rng = np.random.default_rng(spec.seed)
    n_types = min(spec.n_cell_types, len(CELL_TYPES))
    type_codes, donor_codes = _cell_assignments(rng, spec, n_types)
    gene_mean = np.exp(rng.normal(0.0, 1.0, spec.n_genes)).astype(np.float32)
    markers = _markers(rng, spec.n_genes, n_types)
    marker_table = np.zeros((n_types, spec.n_genes), dtype=bool)
    marker_table[np.arange(n_types)[:, None], markers] = True

    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        _write_frames(f, rng, spec, type_codes, donor_codes)
        write = _write_dense if spec.dense else _write_csr
        write(f, rng, spec, type_codes, marker_table, gene_mean)
        from anndata.io import write_elem

        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    tmp.replace(path)
    return path


def _cell_assignments(rng: np.random.Generator, spec: SyntheticSpec,
                      n_types: int) -> tuple[np.ndarray, np.ndarray]:
    types = rng.integers(0, n_types, spec.n_cells).astype(np.int16)
    donors = np.sort(rng.integers(0, spec.n_donors, spec.n_cells)).astype(np.int16)
    return types, donors


def _markers(rng: np.random.Generator, n_genes: int, n_types: int) -> np.ndarray:
    """`(n_types, MARKERS_PER_TYPE)` gene indices, disjoint between types where genes allow."""
    per = min(MARKERS_PER_TYPE, max(1, n_genes // max(1, n_types)))
    genes = rng.permutation(n_genes)[: per * n_types]
    if genes.size < per * n_types:
        genes = rng.integers(0, n_genes, per * n_types)
    return genes.reshape(n_types, per)


def _block_triplets(rng: np.random.Generator, spec: SyntheticSpec, types: np.ndarray,
                    marker_table: np.ndarray,
                    gene_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row lengths, gene indices (sorted per row) and count values for a block of cells.

    Background genes follow a Bernoulli process per gene (drawn as geometric gaps, so the cost
    is per non-zero, not per gene); each cell also expresses its type's markers, strongly.
    """
    n_rows, g = types.size, spec.n_genes
    p = min(1.0, max(1, spec.nnz_per_cell - marker_table.sum(1).max()) / g)
    draws = int(p * g * 1.3 + 40)
    positions = np.cumsum(rng.geometric(p, size=(n_rows, draws)), axis=1) - 1
    mask = marker_table[types]
    rows = np.broadcast_to(np.arange(n_rows)[:, None], positions.shape)
    inside = positions < g
    mask[rows[inside], positions[inside]] = True
    row_idx, genes = np.nonzero(mask)
    values = 1.0 + rng.poisson(gene_mean[genes])
    values += np.where(marker_table[types[row_idx], genes], rng.poisson(12.0, genes.size), 0)
    lengths = np.bincount(row_idx, minlength=n_rows)
    return lengths, genes.astype(np.int32), values.astype(np.float32)


def _blocks(spec: SyntheticSpec):
    for start in range(0, spec.n_cells, spec.block_cells):
        yield start, min(spec.n_cells, start + spec.block_cells)


def _chunk_elements(expected: int, itemsize: int) -> int:
    """The chunk length h5py would choose for a dataset of the final size (as anndata writes)."""
    try:
        from h5py._hl.filters import guess_chunk

        return int(guess_chunk((max(1, expected),), None, itemsize)[0])
    except (ImportError, TypeError, ValueError):  # private helper moved: any sane chunk will do
        return 1 << 16


def _write_csr(f, rng, spec, types, marker_table, gene_mean) -> None:
    grp = f.create_group("X")
    grp.attrs["encoding-type"] = "csr_matrix"
    grp.attrs["encoding-version"] = "0.1.0"
    grp.attrs["shape"] = np.array([spec.n_cells, spec.n_genes], dtype=np.int64)
    chunk = _chunk_elements(spec.n_cells * spec.nnz_per_cell, 4)
    data = grp.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32,
                              chunks=(chunk,), compression="gzip")
    indices = grp.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32,
                                 chunks=(chunk,), compression="gzip")
    indptr = np.zeros(spec.n_cells + 1, dtype=np.int64)
    for a, b in _blocks(spec):
        lengths, genes, values = _block_triplets(rng, spec, types[a:b], marker_table, gene_mean)
        indptr[a + 1:b + 1] = indptr[a] + np.cumsum(lengths)
        start, stop = int(indptr[a]), int(indptr[b])
        for ds, block in ((data, values), (indices, genes)):
            ds.resize((stop,))
            ds[start:stop] = block
    grp.create_dataset("indptr", data=indptr, compression="gzip")


def _write_dense(f, rng, spec, types, marker_table, gene_mean) -> None:
    ds = f.create_dataset("X", shape=(spec.n_cells, spec.n_genes), dtype=np.float32,
                          chunks=True, compression="gzip")
    ds.attrs["encoding-type"] = "array"
    ds.attrs["encoding-version"] = "0.2.0"
    for a, b in _blocks(spec):
        lengths, genes, values = _block_triplets(rng, spec, types[a:b], marker_table, gene_mean)
        block = np.zeros((b - a, spec.n_genes), dtype=np.float32)
        block[np.repeat(np.arange(b - a), lengths), genes] = values
        ds[a:b] = block


def _write_frames(f, rng: np.random.Generator, spec: SyntheticSpec, types: np.ndarray,
                  donors: np.ndarray) -> None:
    import pandas as pd
    from anndata.io import write_elem

    n = spec.n_cells
    donor_names = [f"donor_{d + 1}" for d in range(spec.n_donors)]
    per_donor = {
        "sex": [SEXES[d % len(SEXES)] for d in range(spec.n_donors)],
        "development_stage": [STAGES[d % len(STAGES)] for d in range(spec.n_donors)],
        "self_reported_ethnicity": [ETHNICITIES[d % len(ETHNICITIES)]
                                    for d in range(spec.n_donors)],
        "tissue": [TISSUES[d % len(TISSUES)] for d in range(spec.n_donors)],
        "disease": [DISEASES[d % len(DISEASES)] for d in range(spec.n_donors)],
    }
    type_codes = types.astype(np.int16).copy()
    if spec.nan_type_fraction > 0:
        type_codes[rng.random(n) < spec.nan_type_fraction] = -1
    suspension = np.zeros(n, dtype=np.int8)
    suspension[rng.random(n) < spec.nucleus_fraction] = 1
    n_types = int(types.max()) + 1 if n else 1

    def cat(codes: np.ndarray, categories: list[str]) -> pd.Categorical:
        return pd.Categorical.from_codes(codes, categories=categories)

    columns = {
        "cell_type": cat(type_codes, list(CELL_TYPES[:n_types])),
        "donor_id": cat(donors, donor_names),
        "assay": cat(np.zeros(n, dtype=np.int8), ["10x 3' v3"]),
        "suspension_type": cat(suspension, ["cell", "nucleus"]),
        **{col: _per_donor(vals, donors) for col, vals in per_donor.items()},
        "is_primary_data": np.ones(n, dtype=bool),
    }
    if spec.term_ids:
        columns.update(_term_columns(columns, per_donor.keys()))
    if not spec.labels:
        for col in ("cell_type", *per_donor):
            del columns[col]
    obs = pd.DataFrame(columns, index=pd.Index([f"cell_{i:07d}" for i in range(n)], name=None))
    symbols = gene_symbols(spec.n_genes)
    ids = [ensembl_id(i) for i in range(spec.n_genes)]
    suffixed = rng.random(spec.n_genes) < spec.suffixed_fraction
    names = [f"{s}_{e}" if sfx else s for s, e, sfx in zip(symbols, ids, suffixed)]
    var = pd.DataFrame({"feature_name": pd.Categorical(names),
                        "feature_biotype": pd.Categorical(["gene"] * spec.n_genes),
                        "feature_is_filtered": np.zeros(spec.n_genes, dtype=bool)},
                       index=pd.Index(ids))
    write_elem(f, "obs", obs)
    write_elem(f, "var", var)


def _per_donor(values: list[str], donors: np.ndarray):
    """A categorical column holding each cell's donor-level value."""
    import pandas as pd

    categories = sorted(set(values))
    code_of_donor = np.array([categories.index(v) for v in values], dtype=np.int16)
    return pd.Categorical.from_codes(code_of_donor[donors], categories=categories)


def _term_columns(columns: dict, donor_fields) -> dict:
    """`<field>_ontology_term_id` beside each labelled field, mapped through `TERM_IDS`."""
    import pandas as pd

    labels = {"cell_type": CELL_TYPES, "sex": SEXES, "development_stage": STAGES,
              "self_reported_ethnicity": ETHNICITIES, "tissue": TISSUES, "disease": DISEASES}
    out = {}
    for field in ("cell_type", *donor_fields):
        values = columns[field]
        ids = dict(zip(labels[field], TERM_IDS[field]))
        out[f"{field}_ontology_term_id"] = pd.Categorical.from_codes(
            values.codes, categories=[ids[c] for c in values.categories])
    return out
