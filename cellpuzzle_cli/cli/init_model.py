"""`cellpuzzle init-model`: a tiny from-scratch model for offline tests and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    ConfigFile,
    Format,
    OutputDir,
    OutputFormat,
    Overrides,
    Overwrite,
    Seed,
    console,
    execute,
    given,
)
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.init_model import InitModelSettings
from cellpuzzle_cli.runner import Outcome, Request


def init_model(
    ctx: typer.Context,
    output: OutputDir = Path("tiny-model"),
    tiny: Annotated[bool, typer.Option(
        "--tiny", help="Build a ~150k-parameter Qwen2 with a tokenizer trained on the puzzles.")]
    = False,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Puzzles whose text trains the tokenizer. Default: the latest split's "
                       "train file in the manifest.")] = None,
    hidden_size: Annotated[int, typer.Option(
        "--hidden-size", help="Width of the model (the MLP is twice as wide).")]
    = InitModelSettings.hidden_size,
    layers: Annotated[int, typer.Option(
        "--layers", help="Transformer layers (2 or more can copy from the prompt).")]
    = InitModelSettings.layers,
    heads: Annotated[int, typer.Option(
        "--heads", help="Attention heads (must divide --hidden-size; half as many key/value "
                        "heads, as in Qwen2).")] = InitModelSettings.heads,
    whole_words: Annotated[bool, typer.Option(
        "--whole-words/--no-whole-words",
        help="Keep every gene symbol and cell-type name of the puzzles as one token, so the "
             "model copies whole candidate names; --no-whole-words: plain BPE.")]
    = InitModelSettings.whole_words,
    min_gene_cells: Annotated[int, typer.Option(
        "--min-gene-cells", help="With --whole-words: a gene becomes one token only when this "
                                 "many training cells list it; rarer genes stay BPE pieces, as "
                                 "the genes of held-out cells that no training cell has.")]
    = InitModelSettings.min_gene_cells,
    seed: Seed = InitModelSettings.seed,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    overrides: Overrides = None,
    fmt: Format = OutputFormat.human,
) -> None:
    """A tiny from-scratch model for offline tests and demos (random weights, real tokenizer).

    Any Hugging Face model folder works with sft the same way; this one needs no download.

    Example: cellpuzzle init-model --tiny -o tiny-model --data splits/train.jsonl
    """
    if not tiny:
        raise UserError("init-model only builds tiny models so far: pass --tiny. To fine-tune a "
                        "real model, give its folder to `cellpuzzle sft --model`.")
    options = given(ctx, hidden_size=hidden_size, layers=layers, heads=heads,
                    whole_words=whole_words, min_gene_cells=min_gene_cells, seed=seed)
    execute(ctx, Request("init-model", {"train": data}, output, options, overrides or [], config,
                         overwrite), fmt, _print_result)


def _print_result(outcome: Outcome) -> None:
    result = outcome.result
    console.print(f"[bold green]Tiny model written to {result.out}[/bold green]: "
                  f"{result.parameters:,} parameters, vocabulary {result.vocab_size:,} "
                  f"(tokenizer trained on {result.n_texts:,} texts)")
