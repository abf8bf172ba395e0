"""The helpers every test shares: running the CLI, reading its errors, synthetic puzzles made by
the project's own writers, tiny models and prediction lines.

One module, so a format changes in one place: puzzles come from `format_question` and
`format_answer` in make-qa's layout, split records from `split_record`, RL Parquet from
`rl_rows` and `write_parquet`, prediction lines from predict's `prediction_line`, files from
`io.write_jsonl`. A test that writes a file by hand does so on purpose (a foreign or broken
format) and says so. pytest fixtures (`cli`, the offline environment) live in conftest.py.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellpuzzle_cli.answer import format_answer
from cellpuzzle_cli.prompts import format_question


# -- the CLI ---------------------------------------------------------------------------------------
@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str | Path, manifest: Path | None = None) -> CliResult:
    """Run `cellpuzzle ARGS…` in this process, as a user would from the shell."""
    from cellpuzzle_cli.cli import main

    argv = [str(a) for a in args]
    if manifest is not None:
        argv = ["--manifest", str(manifest), *argv]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


_PANEL_BORDERS = re.compile(r"[│╭╮╰╯─]")


def message_text(result: CliResult) -> str:
    """The output as one line, with rich's panel borders and line breaks taken out."""
    return " ".join(_PANEL_BORDERS.sub(" ", result.output).split())


def _squashed(text: str) -> str:
    return "".join(text.split()).lower()


def assert_says(result: CliResult, *fragments: str) -> None:
    """Every fragment appears in the output, wherever the console wrapped it.

    Rich wraps at 80 columns and folds a word longer than a line (a deep tmp path) in the
    middle, so the message is compared with every border and white space removed: how the
    text was broken into lines can then never decide the test (`fragments` ignore case).
    """
    text = _squashed(message_text(result))
    for fragment in fragments:
        assert _squashed(fragment) in text, f"{fragment!r} not in: {result.output}"


def assert_user_error(result: CliResult, *fragments: str) -> None:
    """What a user sees for a mistake they can fix: exit 2, no traceback, every fragment."""
    assert result.code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert_says(result, *fragments)


# -- synthetic puzzles, made by the real writers ---------------------------------------------------
# Each type's planted markers, exclusive to it, so a model, MarkerStats or a template rationale
# can learn the mapping; every other gene is background shared by all types.
MARKERS: dict[str, tuple[str, ...]] = {
    "T cell": ("CD3D", "CD3E", "IL7R"),
    "B cell": ("MS4A1", "CD79A", "CD79B"),
    "natural killer cell": ("NKG7", "GNLY", "KLRD1"),
    "monocyte": ("LYZ", "CD14", "S100A9"),
    "platelet": ("PPBP", "PF4", "GP9"),
    "dendritic cell": ("FCER1A", "CST3", "CLEC10A"),
}
HOUSEKEEPING = ("MALAT1", "ACTB", "B2M", "TMSB4X", "EEF1A1")
# Small prompts for the RL tests (prompt-length limits, fast rollouts): three cells of four genes.
RL_SHAPE: dict[str, Any] = {"n_cells": (3, 3), "genes_per_cell": 4}


def background_genes(count: int) -> list[str]:
    """`count` numbered genes plus a few real housekeeping ones, shared by every cell type."""
    return [f"GENE{i}" for i in range(1, count + 1)] + list(HOUSEKEEPING)


def _cell_genes(rng: random.Random, markers: Sequence[str], planted: tuple[int, int],
                background: Sequence[str], width: int) -> list[str]:
    """One cell's top genes: some of its type's markers among background genes, shuffled."""
    genes = rng.sample(markers, rng.randint(*planted))
    genes += rng.sample(background, width - len(genes))
    rng.shuffle(genes)
    return genes


def make_puzzles(count: int = 40, seed: int = 0, *, n_cells: tuple[int, int] = (3, 4),
                 genes_per_cell: int = 8, markers: tuple[int, int] = (2, 3), n_donors: int = 4,
                 background: int = 40, long_ids: Sequence[str] = (), long_genes: int = 60,
                 id_prefix: str = "puzzle", extra: int = 0) -> list[dict[str, Any]]:
    """`count` puzzles in make-qa's layout (`question`, `answer`, `candidates`, ids, group).

    Each puzzle holds `n_cells` (a range) cells of distinct types from MARKERS, each listing
    `genes_per_cell` genes of which `markers` (a range) are its type's planted markers; the
    candidates are shuffled, as make-qa shuffles them. Ids `{id_prefix}-{i:03d}` listed in
    `long_ids` get `long_genes` genes a cell (prompts too long for a small model length);
    `background` sets how many numbered genes the cells draw the rest from; `extra` adds that
    many absent types to the candidates (open-set puzzles, as make-qa --extra-candidates).
    """
    rng = random.Random(seed)
    pool = background_genes(background)
    types = sorted(MARKERS)
    puzzles = []
    for i in range(count):
        puzzle_id = f"{id_prefix}-{i:03d}"
        cell_types = rng.sample(types, rng.randint(*n_cells))
        width = long_genes if puzzle_id in long_ids else genes_per_cell
        cells = [_cell_genes(rng, MARKERS[t], markers, pool, width) for t in cell_types]
        candidates = rng.sample(cell_types, len(cell_types))
        if extra:
            absent = [t for t in types if t not in cell_types]
            candidates = rng.sample(candidates + rng.sample(absent, extra), len(cell_types) + extra)
        donor = f"donor{i % n_donors}"
        context = f"The cells come from {donor}, a healthy adult, blood sample."
        puzzles.append({
            "puzzle_id": puzzle_id, "dataset": "synthetic", "group": donor, "donor_id": donor,
            "n": len(cell_types), "cell_ids": [f"{puzzle_id}-c{j}" for j in range(len(cells))],
            "question": format_question(context, cells, candidates),
            "answer": format_answer(cell_types), "candidates": candidates,
        })
    return puzzles


def make_records(count: int = 40, seed: int = 0, *, system_msg: str | None = None,
                 **shape: Any) -> list[dict[str, Any]]:
    """The puzzles of `make_puzzles(count, seed, **shape)` as `split` writes them (the shipped
    system message for their shape unless `system_msg` is given)."""
    from cellpuzzle_cli.split import split_record

    return [split_record(p, system_msg) for p in make_puzzles(count, seed, **shape)]


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """`records` as a JSONL file (parent folders made), written by the project's writer."""
    from cellpuzzle_cli.io import write_jsonl

    write_jsonl(Path(path), records)
    return Path(path)


def make_rl_data(folder: Path, n_train: int = 4, n_val: int = 2, seed: int = 0
                 ) -> tuple[Path, Path]:
    """`train.parquet` and `val.parquet` of small puzzles, as `to-parquet` writes them."""
    from cellpuzzle_cli.to_parquet import rl_rows, write_parquet

    records = make_records(n_train + n_val, seed, **RL_SHAPE)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, part in (("train", records[:n_train]), ("val", records[n_train:])):
        write_parquet(folder / f"{split}.parquet", rl_rows(part, split))
        paths.append(folder / f"{split}.parquet")
    return paths[0], paths[1]


# -- cell tables, as build-context writes them -----------------------------------------------------
TABLE_TYPES = ["B cell", "CD14+ Monocyte", "CD4+/CD25 T Reg", "NK cell", "Dendritic", "Platelet",
               "CD8 T cell", "Erythrocyte"]


def cell_rows(dataset: str, donor: str | None, counts: dict[str, int], batch: str | None = None,
              context: str | None = None, genes_per_cell: int = 4) -> list[dict[str, Any]]:
    """`counts[type]` cells of each type; every cell's genes are unique to it (`<cell_id>_g<j>`),
    so a test can tell which cell a puzzle line lists."""
    context = context if context is not None else f"Donor {donor} is a 40-year-old woman; blood."
    rows = []
    for cell_type, count in counts.items():
        for i in range(count):
            cell_id = f"{dataset}-{donor}-{batch or 'x'}-{cell_type}-{i}".replace(" ", "_")
            rows.append({"cell_id": cell_id, "dataset": dataset, "donor_id": donor,
                         "batch_id": batch, "cell_type": cell_type,
                         "top_genes": [f"{cell_id}_g{j}" for j in range(genes_per_cell)],
                         "context": context, "sex": "female"})
    return rows


def write_cells(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One Parquet cell table in build-context's schema, with a `sex` field column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cellpuzzle_cli.build_context.table import _schema

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema(["sex"], with_ids=False)), path)
    return path


def donors_dataset(root: Path, n_donors: int = 4, cells_per_type: int = 6,
                   n_types: int = 6) -> Path:
    """A folder with one cell table per donor (in a subfolder, as build-context mirrors inputs)."""
    for d in range(n_donors):
        counts = {t: cells_per_type for t in TABLE_TYPES[:n_types]}
        write_cells(root / "study" / f"donor{d}.parquet", cell_rows("ds1", f"D{d}", counts))
    return root


# -- prediction lines, as predict writes them ------------------------------------------------------
FAILED = "OutOfMemoryError: CUDA out of memory"  # the error of a line whose generation failed


def gold_records(golds: Sequence[str], prefix: str = "gold", **fields: Any
                 ) -> list[dict[str, Any]]:
    """Test records with only what a prediction line copies: id, gold, size and `fields`.

    For metric tests whose gold answers are chosen by hand (ontology labels, case variants).
    """
    from cellpuzzle_cli.answer import answer_items

    return [{"puzzle_id": f"{prefix}-{i:03d}", "assistant_msg": gold, "n": len(answer_items(gold)),
             **fields} for i, gold in enumerate(golds)]


def answered(gold: str, think: str = "The marker genes decide.") -> str:
    """A legitimate answer text naming the items of `gold` in order, as a model writes it."""
    from cellpuzzle_cli.answer import answer_items, format_prediction

    return format_prediction(think, answer_items(gold))


def prediction_lines(records: Sequence[dict[str, Any]], texts: Sequence[str | None], *,
                     backend: str = "hf", model: str = "tiny-model") -> list[dict[str, Any]]:
    """predict's shard lines answering each record with its text (None: a failed generation)."""
    from cellpuzzle_cli.predict.shard_run import prediction_line

    return [prediction_line(r, t, backend=backend, model=model,
                            error=FAILED if t is None else None)
            for r, t in zip(records, texts, strict=True)]


# -- models ----------------------------------------------------------------------------------------
def _record_texts(records: Sequence[dict[str, Any]]) -> list[str]:
    """The chat texts of split records: what a tiny model's tokenizer is trained on."""
    return [r[k] for r in records for k in ("system_msg", "user_msg", "assistant_msg")]


def tiny_model_dir(out: Path, records: Sequence[dict[str, Any]] | None = None, *,
                   vocab_size: int = 1024, hidden_size: int = 64, seed: int = 0,
                   varied: bool = False) -> Path:
    """A project-made tiny Qwen2 model (ChatML template with generation markers) in `out`.

    Its tokenizer learns `records` (default `make_records()`). `varied` replaces the small
    initial weights by large random ones: a fresh tiny model answers every prompt with the
    same newline run, which would hide a batching bug (an answer landing on another puzzle).
    """
    from cellpuzzle_cli.init_model import InitModelSettings, build_tiny_model

    out = Path(out)
    config = InitModelSettings(vocab_size=vocab_size, hidden_size=hidden_size, seed=seed)
    build_tiny_model(out, _record_texts(records or make_records()), config)
    if varied:
        _scramble_weights(out, seed + 1)
    return out


def _scramble_weights(model_dir: Path, seed: int) -> None:
    """Every matrix of the saved model redrawn from N(0, 0.5²); norms and biases kept."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(model_dir)


# A Zephyr-style template without {% generation %} markers, as many hub models ship.
FOREIGN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def foreign_model_dir(out: Path, records: Sequence[dict[str, Any]] | None = None,
                      seed: int = 0) -> Path:
    """A tiny Llama model the project's tiny_model did not make: other architecture, other
    special tokens, a chat template with no generation markers, untied embeddings."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from cellpuzzle_cli.init_model import train_tokenizer

    tok = train_tokenizer(_record_texts(records or make_records()), 800)
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

    from cellpuzzle_cli.answer import format_prediction

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
                answer = format_prediction("markers", rng.sample(gold, len(gold)))
                pairs.append((prompt, tokenizer(answer + tokenizer.eos_token,
                                                add_special_tokens=False)["input_ids"]))
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
