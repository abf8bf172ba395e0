"""Benchmark build-context on generated CELLxGENE-like files: cells/s and peak memory.

    python bench/bench_build_context.py                      # 50,000 and 100,000 cells
    python bench/bench_build_context.py --cells 20000 --genes 30000 --workers 1 2

Files are generated once into bench/out/ (gzip CSR, ~2,000 non-zeros per cell, like CELLxGENE
writes them) and reused. Each run happens in a child process; peak RSS is the sum over that
process and its workers, sampled every 20 ms, plus the largest single process from getrusage.
The machine is shared, so the load average is printed next to every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))


def dataset(cells: int, genes: int, nnz: int, donors: int) -> Path:
    from cellpuzzle_cli.synthetic import SyntheticSpec, write_synthetic_h5ad

    path = OUT / f"synthetic_{cells}x{genes}_nnz{nnz}.h5ad"
    if not path.exists():
        print(f"generating {path.name} (once) ...", flush=True)
        t0 = time.perf_counter()
        write_synthetic_h5ad(path, SyntheticSpec(n_cells=cells, n_genes=genes, nnz_per_cell=nnz,
                                                 n_donors=donors, n_cell_types=12, seed=0,
                                                 nucleus_fraction=0.01))
        print(f"  {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return path


def child(path: Path, out: Path, workers: int, top_genes: int) -> None:
    """Run the service once and print a JSON line with its timings."""
    import shutil

    from cellpuzzle_cli.build_context import ContextSettings, build_context

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = build_context([path], out, ContextSettings(workers=workers, top_genes=top_genes))
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"cells": result.cells, "seconds": seconds,
                      "cpu_main_s": me.ru_utime + me.ru_stime,
                      "cpu_workers_s": kids.ru_utime + kids.ru_stime,
                      "cells_per_s": result.cells / seconds,
                      "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "workers_maxrss_mb":
                          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def read_only(path: Path) -> dict:
    """Baseline under the same load: h5py reading X.data and X.indices in slices, nothing else."""
    import h5py

    t0, c0 = time.perf_counter(), time.process_time()
    with h5py.File(path, "r") as f:
        n_cells = f["X"]["indptr"].shape[0] - 1
        for name in ("data", "indices"):
            ds = f["X"][name]
            for start in range(0, ds.shape[0], 4_000_000):
                ds[start:start + 4_000_000]
    seconds = time.perf_counter() - t0
    return {"cells": n_cells, "seconds": seconds, "cells_per_s": n_cells / seconds,
            "cpu_s": time.process_time() - c0}


def measure(path: Path, workers: int, top_genes: int) -> dict:

    out = OUT / f"cells_{path.stem}_w{workers}"
    from child_rss import run_measured

    load_before = os.getloadavg()[0]
    row, peak = run_measured([sys.executable, __file__, "--child", str(path), str(out),
                              str(workers), str(top_genes)], "benchmark child")
    row.update(peak_rss_sum_mb=peak / 2**20, workers=workers, file=path.name,
               load_before=load_before, load_after=os.getloadavg()[0])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 100_000])
    parser.add_argument("--genes", type=int, default=30_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="non-zeros per cell")
    parser.add_argument("--donors", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count() or 1])
    parser.add_argument("--top-genes", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting (best is shown)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time plain h5py reading of X (decompression only)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, out, workers, top = args.child
        child(Path(path), Path(out), int(workers), int(top))
        return

    OUT.mkdir(parents=True, exist_ok=True)
    files = [dataset(n, args.genes, args.nnz, args.donors) for n in args.cells]
    print(f"{'file':<40} {'workers':>7} {'cells':>8} {'s':>6} {'cells/s':>8} "
          f"{'peak RSS sum':>12} {'max proc':>8} {'CPU main+workers':>16} {'load':>9}")
    for path in files:
        if args.baseline:
            load = os.getloadavg()[0]
            base = read_only(path)
            print(f"{path.name:<40} {'h5py':>7} {base['cells']:>8} {base['seconds']:>6.1f} "
                  f"{base['cells_per_s']:>8.0f}   (read X only, 1 process, {base['cpu_s']:.1f} "
                  f"CPU s, load {load:.1f})",
                  flush=True)
        for workers in args.workers:
            runs = [measure(path, workers, args.top_genes) for _ in range(args.repeat)]
            best = max(runs, key=lambda r: r["cells_per_s"])
            biggest = max(best["self_maxrss_mb"], best["workers_maxrss_mb"])
            print(f"{path.name:<40} {workers:>7} {best['cells']:>8} {best['seconds']:>6.1f} "
                  f"{best['cells_per_s']:>8.0f} {best['peak_rss_sum_mb']:>9.0f} MB "
                  f"{biggest:>5.0f} MB {best['cpu_main_s']:>7.1f}+{best['cpu_workers_s']:<6.1f}s "
                  f"{best['load_before']:>4.1f}/{best['load_after']:<4.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
