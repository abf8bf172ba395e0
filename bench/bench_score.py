"""Benchmark: `cellpuzzle score` throughput on 200,000 predictions, process start included.

Writes a synthetic prediction JSONL (bench/out/, gitignored) whose texts look like model
output (a few hundred words of reasoning, then the answer; a mix of correct, swapped,
illegitimate and failed predictions, N 3–15), then times `cellpuzzle score FILE --json …` as a
subprocess. Target: at least 50,000 predictions per second.

    python bench/bench_score.py [--count 200000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import orjson

OUT = Path(__file__).resolve().parent / "out"
TYPES = ["B cell", "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell",
         "natural killer cell", "CD14-positive monocyte", "CD16-positive monocyte",
         "plasmacytoid dendritic cell", "conventional dendritic cell", "megakaryocyte",
         "erythrocyte", "plasma cell", "regulatory T cell", "mast cell", "basophil",
         "gamma-delta T cell"]
WORDS = ["the", "cell", "expresses", "high", "levels", "of", "markers", "consistent", "with", "lineage", "genes", "such", "as", "CD3E", "NKG7", "LYZ", "MS4A1", "suggesting", "this", "assignment", "fits", "best", "by", "elimination"]


def make_predictions(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        for i in range(count):
            n = rng.randint(3, 15)
            gold = rng.sample(TYPES, n)
            pred = list(gold)
            roll = rng.random()
            if roll < 0.3:
                a, b = rng.sample(range(n), 2)
                pred[a], pred[b] = pred[b], pred[a]
            think = " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 400)))
            text = f"<think>\n{think}\n</think>\n<answer>{' | '.join(pred)}</answer>"
            error = None
            if roll > 0.995:
                text, error = None, "generation failed"
            elif roll > 0.97:
                text = think + "\n" + " | ".join(pred)  # no tags: illegitimate
            rec = {"puzzle_id": f"bench-{i:07d}", "prediction": text, "answer": " | ".join(gold),
                   "n": n, "model": "bench", "backend": "synthetic", "seconds": 0.0, "error": error}
            fh.write(orjson.dumps(rec) + b"\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    data = OUT / f"predictions-{args.count}.jsonl"
    if not data.exists():
        t0 = time.perf_counter()
        make_predictions(data, args.count)
        print(f"wrote {data} ({data.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s")
    exe = Path(sys.executable).with_name("cellpuzzle")
    cmd = [str(exe), "--manifest", str(OUT / "bench-manifest.json"), "score", str(data),
           "--json", str(OUT / "score.json")]
    times, cpu = [], []
    for _ in range(args.repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    best, best_cpu = min(times), min(cpu)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"score {args.count} predictions: wall best {best:.2f}s of {args.repeats} "
          f"({', '.join(f'{t:.2f}' for t in times)}) -> {args.count / best:,.0f} predictions/s "
          f"(target >= 50,000)")
    print(f"CPU time (user+sys) of the process, best {best_cpu:.2f}s "
          f"({', '.join(f'{t:.2f}' for t in cpu)}) -> {args.count / best_cpu:,.0f} predictions per "
          "CPU-second (what an idle core would reach)")
    report = orjson.loads((OUT / "score.json").read_bytes())
    print(f"cell_accuracy {report['cell_accuracy']:.4f}  exact_match {report['exact_match']:.4f}  "
          f"format_legitimacy {report['format_legitimacy']:.4f}  errors {report['errors']}")


if __name__ == "__main__":
    main()
