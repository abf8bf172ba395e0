"""The classical baseline on Kang 2018 PBMCs, held-out donors: cell accuracy and exact match by N.

Runs the real pipeline (build-context -> make-qa -> split --group-by donor) with a temporary
manifest, fits `BaselineBackend` on the train split only, predicts the test split, and scores
it with `cellpuzzle score`. Numbers go to docs/baseline.md.

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

    from cellpuzzle_cli.baseline import BaselineBackend
    from cellpuzzle_cli.io import read_records, write_jsonl

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

    train = read_records(work / "splits/train.jsonl")
    test = read_records(work / "splits/test.jsonl")
    t0 = time.perf_counter()
    backend = BaselineBackend(train)
    texts = backend.generate(test)
    seconds = time.perf_counter() - t0
    preds = [{"puzzle_id": r["puzzle_id"], "prediction": t, "answer": r["assistant_msg"], "n": r["n"],
              "model": backend.model, "backend": backend.name, "error": None}
             for r, t in zip(test, texts)]
    write_jsonl(work / "preds/predictions.jsonl", preds)
    train_donors = sorted({r.get("donor_id") or r.get("group") for r in train})
    test_donors = sorted({r.get("donor_id") or r.get("group") for r in test})
    print(f"train: {len(train)} puzzles from {train_donors}; test: {len(test)} puzzles from "
          f"{test_donors}; baseline fit+predict {seconds:.1f}s")
    run(cli, "score", str(work / "preds"), "--reference", str(work / "splits/test.jsonl"),
        "--json", str(work / "score.json"), "--plot", str(work / "by_n.png"))


if __name__ == "__main__":
    main()
