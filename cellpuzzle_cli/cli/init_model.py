"""`cellpuzzle init-model`: a tiny from-scratch model for offline tests and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    ConfigFile,
    OutputDir,
    Overwrite,
    Seed,
    console,
    input_or_latest,
    run_step,
    start,
    step_settings,
)
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.init_model import InitModelSettings
from cellpuzzle_cli.manifest import Artifact, Kind


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
) -> None:
    """A tiny from-scratch model for offline tests and demos (random weights, real tokenizer).

    Any Hugging Face model folder works with sft the same way; this one needs no download.

    Example: cellpuzzle init-model --tiny -o tiny-model --data splits/train.jsonl
    """
    if not tiny:
        raise UserError("init-model only builds tiny models so far: pass --tiny. To fine-tune a "
                        "real model, give its folder to `cellpuzzle sft --model`.")
    from cellpuzzle_cli.config import settings_dict
    from cellpuzzle_cli.init_model import init_tiny_model

    started = start(ctx)
    settings = step_settings(ctx, InitModelSettings, config, hidden_size=hidden_size,
                             layers=layers, heads=heads, whole_words=whole_words,
                             min_gene_cells=min_gene_cells, seed=seed)
    train = input_or_latest(ctx, data, Kind.TRAIN_PUZZLES, "training data (--data)")
    result = run_step(
        ctx, started, "init-model", params={**settings_dict(settings), "data": train},
        inputs=[Artifact(train, "train")], outputs=[Artifact(output, "model")], folder=output,
        overwrite=overwrite, label="init-model",
        work=lambda update: init_tiny_model(train, output, settings, overwrite=overwrite,
                                            progress=update))
    if result is None:
        return
    console.print(f"[bold green]Tiny model written to {result.out}[/bold green]: "
                  f"{result.parameters:,} parameters, vocabulary {result.vocab_size:,} "
                  f"(tokenizer trained on {result.n_texts:,} texts)")
