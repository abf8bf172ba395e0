"""The classical references on Kang 2018 PBMCs, held-out donors, scored side by side.

Runs the real pipeline (build-context -> make-qa -> split --group-by donor) with a temporary
manifest, then `predict --backend baseline` (top genes only) and `predict --backend celltypist`
(full expression), both trained on the train split only, and scores them side by side with
`cellpuzzle score` (hierarchical metrics through docs/kang_cell_types.tsv). Numbers go to
docs/baseline.md.

    python bench/baseline_kang.py [--h5ad ../shared/data/kang2018_pbmc.h5ad] [--work /tmp/kang]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cli: list[str], *args: str) -> None:
    print("$ cellpuzzle", " ".join(args), flush=True)
    subprocess.run([*cli, *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--h5ad", type=Path, default=ROOT.parent / "shared/data/kang2018_pbmc.h5ad")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cellpuzzle-kang"))
    ap.add_argument("--min-n", type=int, default=3)
    ap.add_argument("--max-n", type=int, default=8)
    ap.add_argument("--per-n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cli = [str(Path(sys.executable).with_name("cellpuzzle")), "--manifest", str(work / "cellpuzzle.json")]
    run(cli, "build-context", str(args.h5ad), "-o", str(work / "cells"),
        "--seed", str(args.seed), "--workers", str(args.workers))
    run(cli, "make-qa", str(work / "cells"), "-o", str(work / "puzzles"),
        "--min-n", str(args.min_n), "--max-n", str(args.max_n), "--per-n", str(args.per_n),
        "--seed", str(args.seed))
    run(cli, "split", str(work / "puzzles"), "-o", str(work / "splits"),
        "--group-by", "donor", "--seed", str(args.seed))
    seconds = {}
    for backend in ("baseline", "celltypist"):
        t0 = time.perf_counter()
        run(cli, "predict", "--backend", backend, "-o", str(work / backend))
        seconds[backend] = time.perf_counter() - t0
    print("predict wall time (train + predict, incl. start-up): "
          + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    run(cli, "score", str(work / "baseline"), str(work / "celltypist"),
        "--reference", str(work / "splits/test.jsonl"),
        "--label-ids", str(ROOT / "docs/kang_cell_types.tsv"),
        "--json", str(work / "score.json"), "--plot", str(work / "by_n.png"))

if __name__ == "__main__":
    main()
