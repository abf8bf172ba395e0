"""Benchmark make-qa sampling on one large donor group.

Writes a build-context-shaped Parquet table (default: 100,000 cells of one donor, 20 cell types
with skewed sizes, 50 top genes per cell), then times `make_puzzles` for ~1,000 puzzles with N
from 3 to 15 — split into reading, indexing and sampling+writing.

    python bench/bench_make_qa.py [--cells 100000] [--per-n 77]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def write_table(path: Path, n_cells: int, n_types: int, n_genes: int, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_types + 1)  # Zipf-like: a few big types, some rare ones
    types = rng.choice(n_types, size=n_cells, p=weights / weights.sum())
    vocab = pa.array([f"GENE{i}" for i in range(5000)])
    flat = vocab.take(pa.array(rng.integers(0, 5000, size=n_cells * n_genes)))
    offsets = pa.array(np.arange(0, n_cells * n_genes + 1, n_genes, dtype=np.int32))
    table = pa.table({
        "cell_id": [f"cell{i}" for i in range(n_cells)],
        "dataset": pa.array(["bench"] * n_cells),
        "donor_id": pa.array(["donor1"] * n_cells),
        "batch_id": pa.nulls(n_cells, pa.string()),
        "cell_type": pa.array([f"type {t}" for t in types]),
        "top_genes": pa.ListArray.from_arrays(offsets, flat),
        "context": pa.array(["A 52-year-old female donor; blood; healthy."] * n_cells),
    })
    pq.write_table(table, path)


def main() -> None:
    from cellpuzzle_cli.cell_tables import find_cell_files, load_cells
    from cellpuzzle_cli.make_qa import MakeQaSettings, index_groups, make_puzzles

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--types", type=int, default=20)
    ap.add_argument("--genes", type=int, default=50)
    ap.add_argument("--per-n", type=int, default=77, help="77 × 13 sizes = 1,001 puzzles")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cells = Path(tmp) / "cells"
        cells.mkdir()
        write_table(cells / "bench.parquet", args.cells, args.types, args.genes, seed=0)

        t0 = time.perf_counter()
        loaded = load_cells(find_cell_files(cells))
        t1 = time.perf_counter()
        index_groups(loaded)
        t2 = time.perf_counter()
        result = make_puzzles(cells, Path(tmp) / "puzzles",
                              MakeQaSettings(min_n=3, max_n=15, per_n=args.per_n, seed=0))
        t3 = time.perf_counter()
        size = result.puzzles_path.stat().st_size if result.puzzles_path.exists() else 0

    print(f"cells: {args.cells:,} in one group, {args.types} types, {args.genes} genes each")
    print(f"read needed columns: {t1 - t0:.2f}s   index by type: {t2 - t1:.2f}s")
    print(f"make_puzzles end to end (read + index + sample + write): {t3 - t2:.2f}s "
          f"for {result.n_puzzles:,} puzzles ({result.n_puzzles / (t3 - t2):,.0f} puzzles/s), "
          f"{size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
