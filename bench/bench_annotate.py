"""Benchmark annotate: accuracy on Kang 2018 (held-out donor) and speed on synthetic files.

    python bench/bench_annotate.py kang [--h5ad ../shared/data/kang2018_pbmc.h5ad]
        [--donor 1488] [--all-donors] [--set key=value ...]
    python bench/bench_annotate.py speed [--cells 100000 400000] [--cluster-from-scratch]

kang: the reference is the other donors' cells (all obs kept), the query is one donor's
cells with `cell_type` and `cluster_id` removed. It reports cell-level agreement with the
hidden labels and macro-F1 (over the 8 true types; `unassigned` counts as wrong) for
annotate's default (baseline backend), `--backend celltypist`, and CellTypist itself trained
on the same reference with majority voting (its documented workflow); then the
Megakaryocyte test (that type left out of the candidates) and confidence above/below the
median. `--all-donors` repeats the default for every donor as the query.

speed: synthetic CELLxGENE-schema files (bench_build_context's generator), annotated with
`cluster_col` given (the default backend), beside build-context on the same file in the same
run; each run is a child process whose peak RSS (with its workers) is sampled every 20 ms.
`--cluster-from-scratch` also times clustering 100,000 cells here beside scanpy's own pipeline
run alone. Results go to docs/benchmarks.md ("annotate").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "annotate"
sys.path.insert(0, str(ROOT))
KANG = ROOT.parent / "shared" / "data" / "kang2018_pbmc.h5ad"
MK = "Megakaryocytes"


def kang_files(h5ad: Path, donor: str) -> tuple[Path, Path, object]:
    """(reference, query, hidden labels) for one held-out donor, written once."""
    import anndata

    ref, query = OUT / f"kang_ref_no{donor}.h5ad", OUT / f"kang_query_{donor}.h5ad"
    adata = anndata.read_h5ad(h5ad)
    held = (adata.obs["donor_id"].astype(str) == donor).to_numpy()
    truth = adata.obs["cell_type"].astype(str).to_numpy()[held]
    if not ref.exists() or not query.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        adata[~held].copy().write_h5ad(ref)
        q = adata[held].copy()
        q.obs = q.obs.drop(columns=["cell_type", "cluster_id"])
        q.write_h5ad(query)
    return ref, query, truth


def scores(truth, pred) -> dict:
    import numpy as np
    from sklearn.metrics import f1_score

    types = sorted(set(truth))
    return {"agreement": float(np.mean(truth == pred)),
            "macro_f1": float(f1_score(truth, pred, labels=types, average="macro",
                                       zero_division=0)),
            "unassigned": float(np.mean(pred == "unassigned"))}


def annotate(ref: Path, query: Path, name: str, **settings) -> tuple[object, object, dict]:
    import anndata

    from cellpuzzle_cli.annotate import AnnotateSettings, run_annotate

    out = OUT / f"run_{name}"
    t0 = time.perf_counter()
    result = run_annotate(query, ref, out, AnnotateSettings(**settings), overwrite=True)
    seconds = time.perf_counter() - t0
    obs = anndata.read_h5ad(out / query.name, backed="r").obs
    return (obs["cellpuzzle_label"].astype(str).to_numpy(),
            obs["cellpuzzle_confidence"].to_numpy(), {"seconds": seconds,
                                                      "model": result.model})


def celltypist_majority(ref: Path, query: Path) -> object:
    """CellTypist's documented workflow: train on log1p CP10k, annotate with majority voting."""
    import warnings

    import anndata
    import scanpy as sc

    from cellpuzzle_cli.annotate.celltypist_backend import quiet_celltypist

    celltypist = quiet_celltypist()
    data = {}
    for name, path in (("ref", ref), ("query", query)):
        adata = anndata.read_h5ad(path)
        adata.var_names = adata.var["feature_name"].astype(str)
        adata.var_names_make_unique()
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        data[name] = adata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = celltypist.train(data["ref"], labels="cell_type", n_jobs=1,
                                 check_expression=True)
        result = celltypist.annotate(data["query"], model=model, majority_voting=True)
    labels = result.predicted_labels
    return labels["majority_voting"].astype(str).to_numpy(), \
        labels["predicted_labels"].astype(str).to_numpy()


def confidence_split(truth, pred, conf) -> dict:
    import numpy as np

    right = truth == pred
    above = conf > np.median(conf)
    return {"right_above_median": float(right[above].mean()),
            "right_below_median": float(right[~above].mean()), "above": int(above.sum())}


def missing_type(truth, pred, conf, left_out: str) -> dict:
    """How the cells of a type fare when it is not a candidate: unassigned, and how low their
    confidence ranks (AUROC of "low confidence" for finding them)."""
    import numpy as np
    from scipy.stats import rankdata

    mk = truth == left_out
    ranks = rankdata(conf) / conf.size      # 0..1, lowest confidence near 0
    auc = float((rankdata(-conf)[mk].mean() - (mk.sum() + 1) / 2) / (~mk).sum())
    return {"cells": int(mk.sum()), "left_out_unassigned": float(np.mean(pred[mk] == "unassigned")),
            "others_unassigned": float(np.mean(pred[~mk] == "unassigned")),
            "median_conf": float(np.median(conf[mk])),
            "others_median_conf": float(np.median(conf[~mk])),
            "mean_conf_percentile": float(ranks[mk].mean()),
            "auroc_low_conf": auc}


def kang(args: argparse.Namespace) -> None:
    from cellpuzzle_cli.config import parse_overrides

    extra = parse_overrides(args.set)
    ref, query, truth = kang_files(args.h5ad, args.donor)
    print(f"Kang 2018, query donor {args.donor}: {truth.size} cells; reference {ref.name}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = {}
    pred, conf, info = annotate(ref, query, "default", **extra)
    rows["annotate (default, baseline)"] = {**scores(truth, pred), **info}
    default = (pred, conf)
    if not args.quick:
        pred_ct, _, info = annotate(ref, query, "celltypist", backend="celltypist", **extra)
        rows["annotate --backend celltypist"] = {**scores(truth, pred_ct), **info}
        t0 = time.perf_counter()
        majority, per_cell = celltypist_majority(ref, query)
        seconds = time.perf_counter() - t0
        rows["CellTypist, majority voting"] = {**scores(truth, majority), "seconds": seconds}
        rows["CellTypist, per cell (no voting)"] = {**scores(truth, per_cell),
                                                   "seconds": seconds}
    for name, row in rows.items():
        print(f"| {name} | {row['agreement']:.4f} | {row['macro_f1']:.4f} | "
              f"{row['unassigned']:.3f} | {row['seconds']:.1f} s |", flush=True)
    print("confidence:", json.dumps(confidence_split(truth, *default)), flush=True)
    for left_out in sorted(set(truth)) if args.each_type else [MK]:
        types = sorted(set(truth) - {left_out})
        pred, conf, _ = annotate(ref, query, "left_out", candidates=types, **extra)
        print(f"{left_out} not among the candidates:",
              json.dumps({**missing_type(truth, pred, conf, left_out), **scores(truth, pred)}),
              flush=True)
    if args.all_donors:
        import anndata

        donors = sorted(anndata.read_h5ad(args.h5ad, backed="r").obs["donor_id"].astype(str)
                        .unique())
        for donor in donors:
            ref, query, truth = kang_files(args.h5ad, donor)
            pred, conf, _ = annotate(ref, query, f"donor{donor}", **extra)
            majority, per_cell = celltypist_majority(ref, query)
            print(f"donor {donor}: annotate {json.dumps(scores(truth, pred))} | CellTypist "
                  f"majority {json.dumps(scores(truth, majority))}", flush=True)


def synthetic(cells: int) -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_build_context import dataset

    return dataset(cells, 30_000, 2_000, 8)


PHASES: dict[str, float] = {}


def phase_clock(t0: float):
    """A progress callback noting when each phase (a new description) starts."""
    def progress(advance=1, total=None, description=None) -> None:
        if description:
            PHASES.setdefault(description.split(" ")[0], round(time.perf_counter() - t0, 1))

    return progress


def speed_child(kind: str, path: Path, out: Path) -> None:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if kind == "build-context":
        from cellpuzzle_cli.build_context import ContextSettings, build_context

        cells = build_context([path], out, ContextSettings()).cells
    else:
        from cellpuzzle_cli.annotate import AnnotateSettings, run_annotate

        ref = OUT / "synthetic_reference.h5ad"
        plot = kind == "annotate"
        cells = run_annotate(path, ref, out, AnnotateSettings(
            cluster_col="cell_type" if kind != "cluster" else None, cell_type_col="cell_type",
            plot=plot or kind == "cluster"), progress=phase_clock(t0)).cells
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    import resource

    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"cells": cells, "seconds": seconds, "cells_per_s": cells / seconds,
                      "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                      "phases": PHASES}))


def measure(kind: str, path: Path) -> dict:
    from child_rss import run_measured

    out = OUT / f"speed_{kind}_{path.stem}"
    load = os.getloadavg()[0]
    row, peak = run_measured([sys.executable, __file__, "child", kind, str(path), str(out)],
                             f"{kind} on {path.name}")
    row.update(peak_rss_mb=peak / 2**20, load_before=load, load_after=os.getloadavg()[0])
    return row


def reference_slice(path: Path, ref: Path, cells: int) -> None:
    """The first cells of a synthetic file as a labelled reference (the generator draws each
    file's marker genes from its seed, so the reference must come from the same file)."""
    import anndata

    adata = anndata.read_h5ad(path, backed="r")
    adata[:cells].to_memory().write_h5ad(ref, compression="gzip")


def speed(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ref = OUT / "synthetic_reference.h5ad"
    if not ref.exists():
        reference_slice(synthetic(100_000), ref, 20_000)
    kinds = ["build-context", "annotate-noplot", "annotate"]
    for cells in args.cells or []:
        path = synthetic(cells)
        for kind in kinds:
            runs = [measure(kind, path) for _ in range(args.repeat)]
            row = min(runs, key=lambda r: r["seconds"])
            print(f"| {cells:,} | {kind} | {row['seconds']:.1f} s | {row['cells_per_s']:,.0f} | "
                  f"{row['cpu_s']:.1f} s | {row['peak_rss_mb']:,.0f} MB | "
                  f"{row['load_before']:.1f}/{row['load_after']:.1f} |", flush=True)
    if args.cluster_from_scratch:
        path = synthetic(100_000)
        row = measure("cluster", path)
        print(f"| 100,000 | annotate, clustering here | {row['seconds']:.1f} s | "
              f"{row['peak_rss_mb']:,.0f} MB | phases start (s): {row['phases']} |", flush=True)
        row = measure("scanpy", path)
        print(f"| 100,000 | scanpy pipeline alone | {row['seconds']:.1f} s | "
              f"{row['peak_rss_mb']:,.0f} MB |", flush=True)


def scanpy_child(path: Path) -> None:
    """scanpy's own pipeline alone: read, normalise, log1p, HVG, PCA, neighbours, Leiden."""
    import anndata
    import scanpy as sc

    t0 = time.perf_counter()
    adata = anndata.read_h5ad(path)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, subset=True)
    sc.pp.pca(adata, n_comps=50, random_state=0)
    # scanpy's default search object fails under scipy 1.17 above 8,191 cells (csr_array has no
    # getnnz); annotate's fix, the same pynndescent search returning csr_matrix, is used here too
    from cellpuzzle_cli.annotate.cluster import neighbors
    from cellpuzzle_cli.annotate.settings import AnnotateSettings

    neighbors(adata, AnnotateSettings(n_neighbors=15, seed=0))
    sc.tl.leiden(adata, resolution=25.0, random_state=0, flavor="igraph", n_iterations=2,
                 directed=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"cells": adata.n_obs, "seconds": seconds,
                      "cells_per_s": adata.n_obs / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kang")
    k.add_argument("--h5ad", type=Path, default=KANG)
    k.add_argument("--donor", default="1488")
    k.add_argument("--all-donors", action="store_true")
    k.add_argument("--quick", action="store_true", help="the default backend only")
    k.add_argument("--each-type", action="store_true",
                   help="leave each type out of the candidates in turn, not only Megakaryocytes")
    k.add_argument("--set", nargs="*", help="settings as key=value")
    s = sub.add_parser("speed")
    s.add_argument("--cells", type=int, nargs="*", default=[100_000, 400_000])
    s.add_argument("--cluster-from-scratch", action="store_true")
    s.add_argument("--repeat", type=int, default=1, help="runs per setting (fastest shown)")
    c = sub.add_parser("child")
    c.add_argument("kind")
    c.add_argument("path", type=Path)
    c.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.what == "kang":
        kang(args)
    elif args.what == "speed":
        speed(args)
    elif args.kind == "scanpy":
        scanpy_child(args.path)
    else:
        speed_child(args.kind, args.path, args.out)


if __name__ == "__main__":
    main()
