"""Synthetic puzzles, verl-schema RL Parquet files and a tiny model, for the rl/convert tests."""

from __future__ import annotations

import random
from pathlib import Path

from cellpuzzle_cli.answer import format_answer
from cellpuzzle_cli.prompts import SYSTEM_PROMPT, chat_messages, format_question

TYPES = ["T cell", "B cell", "NK cell", "monocyte", "platelet", "erythrocyte"]
GENES = ["CD3E", "CD19", "NKG7", "LYZ", "PPBP", "HBB", "MS4A1", "GNLY", "CD14", "PF4", "CD8A", "IL7R"]


def synthetic_puzzles(count: int, seed: int = 0, n: int = 3) -> list[dict]:
    """Puzzles of `n` cells each, with candidates shuffled and one answer per cell."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        types = rng.sample(TYPES, n)
        cells = [rng.sample(GENES, 4) for _ in types]
        candidates = sorted(types)
        out.append({"puzzle_id": f"p{i}", "n": n, "group": f"donor{i % 2}",
                    "question": format_question(f"Donor {i % 2}, blood.", cells, candidates),
                    "answer": format_answer(types)})
    return out


def write_rl_parquet(path: Path, puzzles: list[dict], split: str) -> Path:
    """One Parquet file in verl's RL schema, as `to-parquet` writes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{
        "data_source": "cellpuzzle",
        "prompt": chat_messages(SYSTEM_PROMPT, p["question"]),
        "ability": "cell_type_annotation",
        "reward_model": {"style": "rule", "ground_truth": p["answer"]},
        "extra_info": {"split": split, "index": i, "puzzle_id": p["puzzle_id"], "n": p["n"],
                       "group": p["group"]},
    } for i, p in enumerate(puzzles)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def make_rl_data(folder: Path, n_train: int = 4, n_val: int = 2) -> tuple[Path, Path]:
    puzzles = synthetic_puzzles(n_train + n_val)
    return (write_rl_parquet(folder / "train.parquet", puzzles[:n_train], "train"),
            write_rl_parquet(folder / "val.parquet", puzzles[n_train:], "val"))


def make_tiny_model(folder: Path) -> Path:
    from cellpuzzle_cli.tiny_model import TinyModelConfig, build_tiny_model

    texts = []
    for p in synthetic_puzzles(8):
        texts += [p["question"], f"<think>\nmarkers\n</think>\n<answer>{p['answer']}</answer>"]
    build_tiny_model(folder, texts, TinyModelConfig(vocab_size=600))
    return folder


def assert_exit2(result, *fragments: str) -> None:
    """Exit 2, no traceback, and each fragment in the message even when the panel wrapped it."""
    assert result.code == 2, result.output
    assert "Traceback" not in result.output, result.output
    text = " ".join(result.output.replace("│", " ").split()).lower()
    for fragment in fragments:
        assert fragment.lower() in text, f"{fragment!r} not in: {result.output}"
