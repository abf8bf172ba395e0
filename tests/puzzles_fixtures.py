"""Build-context-shaped cell tables for the make-qa and split tests, written with pyarrow."""

from __future__ import annotations

from pathlib import Path

TYPES = ["B cell", "CD14+ Monocyte", "CD4+/CD25 T Reg", "NK cell", "Dendritic", "Platelet",
         "CD8 T cell", "Erythrocyte"]


def cell_rows(dataset: str, donor: str | None, counts: dict[str, int], batch: str | None = None,
              context: str | None = None, genes_per_cell: int = 4) -> list[dict]:
    """`counts[type]` cells of each type; every cell's genes are unique to it (`<cell_id>_g<j>`)."""
    context = context if context is not None else f"Donor {donor} is a 40-year-old woman; blood."
    rows = []
    for cell_type, count in counts.items():
        for i in range(count):
            cell_id = f"{dataset}-{donor}-{batch or 'x'}-{cell_type}-{i}".replace(" ", "_")
            rows.append({"cell_id": cell_id, "dataset": dataset, "donor_id": donor,
                         "batch_id": batch, "cell_type": cell_type,
                         "top_genes": [f"{cell_id}_g{j}" for j in range(genes_per_cell)],
                         "context": context, "sex": "female"})
    return rows


def write_cells(path: Path, rows: list[dict]) -> Path:
    """One Parquet cell table with the build-context schema (batch_id nullable, extra columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("cell_id", pa.string()), ("dataset", pa.string()),
                        ("donor_id", pa.string()), ("batch_id", pa.string()),
                        ("cell_type", pa.string()), ("top_genes", pa.list_(pa.string())),
                        ("context", pa.string()), ("sex", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def donors_dataset(root: Path, n_donors: int = 4, cells_per_type: int = 6,
                   n_types: int = 6) -> Path:
    """A folder with one Parquet per donor (in a subfolder, as build-context mirrors inputs)."""
    for d in range(n_donors):
        counts = {t: cells_per_type for t in TYPES[:n_types]}
        write_cells(root / "study" / f"donor{d}.parquet", cell_rows("ds1", f"D{d}", counts))
    return root
