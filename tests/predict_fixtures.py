"""Synthetic split records and a tiny model whose answers vary, for the predict tests."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from cellpuzzle_cli.answer import format_answer
from cellpuzzle_cli.io import write_jsonl
from cellpuzzle_cli.prompts import SYSTEM_PROMPT, format_question

GENES = [f"G{i}" for i in range(300)]
TYPES = ["T cell", "B cell", "NK cell", "monocyte", "dendritic cell", "platelet",
         "erythrocyte", "neutrophil", "plasma cell", "mast cell"]


def make_records(count: int, seed: int = 0, long_ids: tuple[str, ...] = ()) -> list[dict]:
    """Split-style test records; ids in `long_ids` get a much longer prompt (60 genes a cell)."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        pid = f"puzzle-{i:03d}"
        n = rng.randint(3, 6)
        types = rng.sample(TYPES, n)
        genes = 60 if pid in long_ids else rng.randint(5, 12)
        cells = [rng.sample(GENES, genes) for _ in types]
        records.append({"system_msg": SYSTEM_PROMPT,
                        "user_msg": format_question(f"Donor {i % 4}: adult blood sample.",
                                                    cells, sorted(types)),
                        "assistant_msg": format_answer(types), "puzzle_id": pid, "n": n,
                        "group": f"donor{i % 4}"})
    return records


def write_records(path: Path, records: list[dict]) -> Path:
    write_jsonl(path, records)
    return path


def build_varied_model(out_dir: Path, records: list[dict]) -> Path:
    """A tiny model with large random weights, so different prompts get different answers.

    The freshly initialised tiny model answers every prompt with the same newline run, which
    would hide a batching bug (a row's answer landing on another puzzle).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from cellpuzzle_cli.tiny_model import build_tiny_model

    out_dir = Path(out_dir)
    build_tiny_model(out_dir, [r["user_msg"] + "\n" + r["assistant_msg"] for r in records])
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    staged = out_dir.parent / (out_dir.name + ".weights")
    model.save_pretrained(staged)
    shutil.copy(staged / "model.safetensors", out_dir / "model.safetensors")
    shutil.rmtree(staged)
    return out_dir
