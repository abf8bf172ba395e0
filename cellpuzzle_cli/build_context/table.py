"""Writing one file's cell table as Parquet row groups, chunk by chunk, in order."""

from __future__ import annotations

import numpy as np

from cellpuzzle_cli.build_context.h5ad import Coded
from cellpuzzle_cli.build_context.labels import ID_COLUMN
from cellpuzzle_cli.build_context.plan import FilePlan


def _schema(field_columns: list[str], with_ids: bool):
    import pyarrow as pa

    cols = [("cell_id", pa.string()), ("dataset", pa.string()), ("donor_id", pa.string()),
            ("batch_id", pa.string()), ("cell_type", pa.string()),
            ("top_genes", pa.list_(pa.string())), ("context", pa.string())]
    ids = [(ID_COLUMN, pa.string())] if with_ids else []
    return pa.schema(cols + [(c, pa.string()) for c in field_columns] + ids)


class TableWriter:
    """Writes one file's chunks, in order, as Parquet row groups."""

    def __init__(self, plan: FilePlan, field_columns: list[str], with_ids: bool = False):
        """`with_ids`: write the cell type's ontology IDs (null for files without them)."""
        import pyarrow as pa

        self.plan, self.field_columns, self.with_ids = plan, field_columns, with_ids
        self.schema = _schema(field_columns, with_ids)
        self.genes = pa.array(plan.genes, type=pa.string())
        self.dataset = pa.array([plan.report.dataset], type=pa.string())
        self.writer = None

    def write(self, a: int, b: int, lengths: np.ndarray, genes: np.ndarray) -> None:
        """Rows a..b of the plan; cells with no expressed gene (length 0) are left out."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = self.plan
        rows = None if lengths.all() else np.flatnonzero(lengths)
        if rows is not None:
            if rows.size == 0:
                return
            lengths = lengths[rows]
        n = lengths.size

        def pick(values: np.ndarray) -> np.ndarray:
            return values[a:b] if rows is None else values[a:b][rows]

        def take(coded: Coded | None) -> pa.Array:
            if coded is None:
                return pa.nulls(n, pa.string())
            codes = pick(coded[0])
            return pa.array(coded[1], type=pa.string()).take(pa.array(codes, mask=codes < 0))

        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        top = pa.ListArray.from_arrays(pa.array(offsets), self.genes.take(pa.array(genes)))
        columns = [pa.array(pick(p.cell_ids), type=pa.string()),
                   self.dataset.take(pa.array(np.zeros(n, dtype=np.int32))),
                   take(p.donor), take(p.batch), take(p.cell_type), top, take(p.context)]
        columns += [take(p.fields.get(c)) for c in self.field_columns]
        if self.with_ids:
            columns.append(take(p.cell_type_ids))
        table = pa.Table.from_arrays(columns, schema=self.schema)
        if self.writer is None:
            self.plan.out_path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.plan.out_path, self.schema, compression="zstd")
        self.writer.write_table(table, row_group_size=n)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
