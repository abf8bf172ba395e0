"""Shared training fixtures: synthetic split records with planted marker genes, tiny models.

Import the functions (`from train_fixtures import make_records, tiny_model_dir`) or use the
pytest fixtures at the bottom after `from train_fixtures import *` style imports.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from cellpuzzle_cli.answer import format_answer
from cellpuzzle_cli.prompts import SYSTEM_PROMPT, format_question

MARKERS: dict[str, list[str]] = {
    "T cell": ["CD3D", "CD3E", "IL7R"],
    "B cell": ["MS4A1", "CD79A", "CD79B"],
    "natural killer cell": ["NKG7", "GNLY", "KLRD1"],
    "monocyte": ["LYZ", "CD14", "S100A9"],
    "platelet": ["PPBP", "PF4", "GP9"],
    "dendritic cell": ["FCER1A", "CST3", "CLEC10A"],
}
BACKGROUND = [f"GENE{i}" for i in range(1, 41)] + ["MALAT1", "ACTB", "B2M", "TMSB4X", "EEF1A1"]


def make_records(n: int = 40, seed: int = 0, n_cells: tuple[int, int] = (3, 4),
                 n_donors: int = 4, genes_per_cell: int = 8) -> list[dict[str, Any]]:
    """`n` split records (the `split` command's train.jsonl layout) whose cells carry markers.

    Each cell's top genes hold two or three of its type's markers among background genes, so a
    model (or MarkerStats) can learn the mapping.
    """
    rng = random.Random(seed)
    types = sorted(MARKERS)
    records = []
    for p in range(n):
        k = rng.randint(*n_cells)
        cell_types = rng.sample(types, k)
        cells = []
        for t in cell_types:
            markers = rng.sample(MARKERS[t], rng.randint(2, 3))
            genes = markers + rng.sample(BACKGROUND, genes_per_cell - len(markers))
            rng.shuffle(genes)
            cells.append(genes)
        candidates = sorted(cell_types)
        rng.shuffle(candidates)
        donor = f"donor{p % n_donors}"
        context = f"The cells come from {donor}, a healthy adult, blood sample."
        records.append({
            "system_msg": SYSTEM_PROMPT,
            "user_msg": format_question(context, cells, candidates),
            "assistant_msg": format_answer(cell_types),
            "puzzle_id": f"synth-{p:04d}",
            "n": k,
            "group": donor,
            "dataset": "synthetic",
            "donor_id": donor,
            "cell_ids": [f"c{p}_{i}" for i in range(k)],
        })
    return records


def record_texts(records: list[dict[str, Any]]) -> list[str]:
    return [r[k] for r in records for k in ("system_msg", "user_msg", "assistant_msg")]


def tiny_model_dir(out: Path, records: list[dict[str, Any]] | None = None, seed: int = 0) -> Path:
    """A project-made tiny Qwen2 model (ChatML template with generation markers) in `out`."""
    from cellpuzzle_cli.tiny_model import TinyModelConfig, build_tiny_model

    build_tiny_model(Path(out), record_texts(records or make_records()),
                     TinyModelConfig(vocab_size=1024, seed=seed))
    return Path(out)


# A Zephyr-style template without {% generation %} markers, as many hub models ship.
FOREIGN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def foreign_model_dir(out: Path, records: list[dict[str, Any]] | None = None, seed: int = 0) -> Path:
    """A tiny Llama model the project's tiny_model did not make: other architecture, other
    special tokens, a chat template with no generation markers, untied embeddings."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from cellpuzzle_cli.tiny_model import train_tokenizer

    tok = train_tokenizer(record_texts(records or make_records()), 800)
    tok.add_special_tokens({"eos_token": "</s>", "bos_token": "<s>"})
    tok.chat_template = FOREIGN_TEMPLATE
    tok.padding_side = "right"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    from cellpuzzle_cli.io import write_jsonl

    write_jsonl(Path(path), records)
    return Path(path)


def message_text(result) -> str:
    """A CLI result's output as one line, with the error panel's borders removed."""
    import re

    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def assert_refused(result, *fragments: str) -> None:
    """Exit 2, no traceback, and every fragment in the message (panel line breaks ignored)."""
    assert result.code == 2, result.output
    assert "Traceback" not in result.output, result.output
    text = message_text(result).lower()
    for fragment in fragments:
        assert fragment.lower() in text, f"{fragment!r} not in: {text}"


def one_torch_thread():
    """Generator for an autouse fixture: tiny models train ~10x faster on one thread when the
    machine's cores are shared (threads otherwise spin against each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
