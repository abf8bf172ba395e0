"""Wires one module per command into the Typer app (like huggingface_hub's `hf`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli import __version__
from cellpuzzle_cli.cli import (
    annotate,
    build_context,
    convert_ckpt,
    init_model,
    make_qa,
    manifest_cmd,
    merge_lora,
    predict,
    rl,
    score,
    sft,
    split,
    to_parquet,
)
from cellpuzzle_cli.manifest import DEFAULT_PATH, Manifest
from cellpuzzle_cli.steps import kind_of

app = typer.Typer(
    name="cellpuzzle",
    help="From single-cell RNA-seq (.h5ad) to a trained, evaluated LLM cell-type annotator.\n\n"
         "Pipeline: build-context → make-qa → split → sft → merge-lora → to-parquet → rl → "
         "convert-ckpt → predict → score; annotate labels a new sample. Each step records its "
         "outputs in the manifest, and the "
         "next step takes them from there when you give no input.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cellpuzzle {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    manifest: Annotated[Path, typer.Option("--manifest", "-m", envvar="CELLPUZZLE_MANIFEST",
                                           help="Manifest (artifact ledger) to read and append.")]
    = DEFAULT_PATH,
    allow_changed: Annotated[bool, typer.Option(
        "--allow-changed", help="Use inputs the manifest recorded even where their content has "
                                "changed since (their new hashes are recorded).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    # one Manifest per run: it remembers what it hashed
    ctx.obj = {"manifest": Manifest(manifest, kind_of=kind_of), "allow_changed": allow_changed}


app.command("build-context")(build_context.build_context)
app.command("make-qa")(make_qa.make_qa)
app.command("split")(split.split)
app.command("init-model")(init_model.init_model)
app.command("sft")(sft.sft)
app.command("merge-lora")(merge_lora.merge_lora)
app.command("to-parquet")(to_parquet.to_parquet)
app.add_typer(rl.app, name="rl", help="Reinforcement learning: GRPO or PPO (verl on Ray, or TRL on one machine).")
app.command("convert-ckpt")(convert_ckpt.convert_ckpt)
app.command("predict")(predict.predict)
app.command("score")(score.score)
app.command("annotate")(annotate.annotate)
app.command("manifest")(manifest_cmd.show)
