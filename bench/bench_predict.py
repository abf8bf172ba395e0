"""Benchmark: transformers backend, one prompt at a time (Cell-o1's way) vs batches of 16.

Both runs use the same model, the same puzzle prompts and the same number of generated
tokens per prompt (min_new_tokens = max_new_tokens), through the real `run_predict` path
(prompt building, length sorting, left padding, shard file writes). Prints a JSON summary and
a Markdown table row set for docs/benchmarks.md.

    python bench/bench_predict.py --prompts 32 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

from cellpuzzle_cli.answer import format_answer
from cellpuzzle_cli.init_model import InitModelSettings, build_tiny_model
from cellpuzzle_cli.io import write_jsonl
from cellpuzzle_cli.predict.settings import PredictJob, PredictSettings
from cellpuzzle_cli.predict.shard_run import run_predict
from cellpuzzle_cli.prompts import SYSTEM_PROMPT, format_question

# Real marker genes, so prompts tokenise like real ones (symbols, not numbered placeholders).
GENES = ["CD3E", "CD3D", "CD2", "IL7R", "CCR7", "LEF1", "TCF7", "CD8A", "CD8B", "GZMK",
         "GZMB", "GZMH", "PRF1", "NKG7", "GNLY", "KLRD1", "KLRF1", "NCAM1", "FCGR3A",
         "MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "IGHM", "IGKC", "JCHAIN", "MZB1",
         "XBP1", "CD14", "LYZ", "S100A8", "S100A9", "VCAN", "FCN1", "CST3", "LST1",
         "AIF1", "MS4A7", "CD1C", "FCER1A", "CLEC10A", "LILRA4", "IRF7", "PPBP", "PF4",
         "GP9", "HBB", "HBA1", "HBA2", "CPA3", "TPSAB1", "KIT", "CD34", "SPINK2", "MKI67",
         "TOP2A", "RPL13", "RPS27", "MALAT1", "ACTB", "B2M", "TMSB4X", "FTL", "FTH1",
         "HLA-DRA", "HLA-DRB1", "CD74", "EEF1A1", "TPT1", "RPLP1", "RPS12", "IL32", "CCL5"]
TYPES = ("B cell", "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell",
         "natural killer cell", "classical monocyte", "non-classical monocyte",
         "plasmacytoid dendritic cell", "platelet", "erythrocyte", "mast cell")
CONTEXT = ("Donor: 42-year-old female, European ancestry. Tissue: blood. Disease: COVID-19. "
           "Assay: 10x 3' v3.")


def puzzles(count: int, genes_per_cell: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        types = rng.sample(TYPES, rng.randint(3, 8))
        cells = [rng.sample(GENES, genes_per_cell) for _ in types]
        out.append({"system_msg": SYSTEM_PROMPT, "puzzle_id": f"bench-{i:03d}", "n": len(types),
                    "user_msg": format_question(CONTEXT, cells, sorted(types)),
                    "assistant_msg": format_answer(types)})
    return out


def _cpu_seconds() -> float:
    """This process's CPU time: less sensitive than wall time to the other jobs on the box."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--genes-per-cell", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    try:
        _run(args, work, torch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, torch) -> None:
    records = puzzles(args.prompts, args.genes_per_cell)
    data = work / "test.jsonl"
    write_jsonl(data, records)
    model = work / "model"
    cfg = InitModelSettings(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                          layers=args.layers, heads=args.hidden // 64)
    params = build_tiny_model(model, [r["user_msg"] + "\n" + r["assistant_msg"] for r in records]
                              + [SYSTEM_PROMPT], cfg)

    rows = []
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        settings = PredictJob(
            data=data, output_dir=work / f"out-bs{bs}", model=model,
            settings=PredictSettings(backend="hf", batch_size=bs, max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.max_new_tokens))
        load1 = os.getloadavg()[0]
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        result = run_predict(settings)
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        rows.append({"batch_size": bs, "prompts": result.generated, "gen_seconds": round(result.seconds, 2),
                     "wall_seconds": round(wall, 2),
                     "prompts_per_s": round(result.prompts_per_s, 3),
                     "tokens_per_s": round(result.tokens_per_s, 1),
                     "cpu_seconds": round(cpu, 2),
                     "prompts_per_cpu_s": round(result.generated / cpu, 3),
                     "prompt_tokens_mean": round(result.prompt_tokens / max(1, result.generated), 1),
                     "completion_tokens": result.completion_tokens,
                     "load_before": round(load1, 2), "load_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "model_params": params, "hidden": args.hidden, "layers": args.layers,
               "max_new_tokens": args.max_new_tokens, "runs": rows}
    if len(rows) >= 2:
        summary["speedup_prompts_per_s"] = round(rows[-1]["prompts_per_s"] / rows[0]["prompts_per_s"], 2)
        summary["speedup_prompts_per_cpu_s"] = round(
            rows[-1]["prompts_per_cpu_s"] / rows[0]["prompts_per_cpu_s"], 2)
    print(json.dumps(summary, indent=2))
    print("\n| batch | prompts/s | tokens/s | gen s | prompts per CPU-s | load avg (before/after) |"
          "\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['prompts_per_s']:.3f} | {r['tokens_per_s']:.1f} | "
              f"{r['gen_seconds']} | {r['prompts_per_cpu_s']:.3f} | "
              f"{r['load_before']} / {r['load_after']} |")


if __name__ == "__main__":
    main()
