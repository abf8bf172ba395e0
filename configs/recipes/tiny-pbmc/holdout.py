"""The demo's new sample: the PBMC cells no training puzzle shows, as a lab would hold them.

    python configs/recipes/tiny-pbmc/holdout.py PBMC.h5ad SPLITS_DIR OUT_DIR

Writes OUT_DIR/reference.h5ad (the cells of the training puzzles, labelled) and
OUT_DIR/query.h5ad (the held-out cells, those of the test puzzles only) with the label column
`bulk_labels` renamed `truth`: annotate never reads it unless told to compare with it
(`--truth-col truth`), so the demo can say how often the annotation agrees with the authors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata
import orjson

LABELS = "bulk_labels"


def cell_ids(split: Path) -> set[str]:
    return {str(c) for line in split.read_bytes().splitlines() if line.strip()
            for c in orjson.loads(line)["cell_ids"]}


def main(h5ad: str, splits: str, out: str) -> None:
    adata = anndata.read_h5ad(h5ad)
    train, test = cell_ids(Path(splits) / "train.jsonl"), cell_ids(Path(splits) / "test.jsonl")
    names = adata.obs_names.astype(str)
    Path(out).mkdir(parents=True, exist_ok=True)
    adata[names.isin(sorted(train - test))].copy().write_h5ad(Path(out) / "reference.h5ad")
    query = adata[names.isin(sorted(test))].copy()
    query.obs = query.obs.rename(columns={LABELS: "truth"})
    query.write_h5ad(Path(out) / "query.h5ad")
    print(f"reference: {int(names.isin(sorted(train - test)).sum())} cells; query (held out): "
          f"{query.n_obs} cells -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
