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


def write_split_records(path: Path, puzzles: list[dict]) -> Path:
    """Puzzles as `split` writes them (system/user/assistant turns), the input of to-parquet."""
    from cellpuzzle_cli.io import write_jsonl

    records = [{"system_msg": SYSTEM_PROMPT, "user_msg": p["question"],
                "assistant_msg": f"<think>\nmarkers\n</think>\n<answer>{p['answer']}</answer>",
                "puzzle_id": p["puzzle_id"], "n": p["n"], "group": p["group"]} for p in puzzles]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, records)
    return path


def teach_answer_format(model_dir: Path, train_parquet: Path, out_dir: Path, steps: int = 200,
                        lr: float = 3e-3, seed: int = 0) -> Path:
    """The model fine-tuned to answer in the puzzle layout with a random order of the gold types.

    A random model never writes a legitimate answer, so every sample scores -1 and GRPO's
    advantages (and its update) are zero. This model writes the layout with varying
    assignments, so samples of one prompt score differently (-1 for a repeated type, 0 to 1
    by position): the reward spread that makes a GRPO step move the weights.
    """
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = pq.read_table(train_parquet).to_pylist()
    prompts = [tokenizer(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                                       tokenize=False),
                         add_special_tokens=False)["input_ids"] for r in rows]
    golds = [r["reward_model"]["ground_truth"].split(" | ") for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread
    try:
        for _ in range(steps):
            pairs = []
            for prompt, gold in zip(prompts, golds):
                order = rng.sample(gold, len(gold))
                answer = (f"<think>\nmarkers\n</think>\n<answer>{' | '.join(order)}</answer>"
                          f"{tokenizer.eos_token}")
                pairs.append((prompt, tokenizer(answer, add_special_tokens=False)["input_ids"]))
            width = max(len(p) + len(a) for p, a in pairs)
            ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
            labels = torch.full((len(pairs), width), -100)
            mask = torch.zeros((len(pairs), width), dtype=torch.long)
            for i, (prompt, answer) in enumerate(pairs):
                end = len(prompt) + len(answer)
                ids[i, :end] = torch.tensor(prompt + answer)
                labels[i, len(prompt):end] = torch.tensor(answer)
                mask[i, :end] = 1
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
