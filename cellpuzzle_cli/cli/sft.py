"""`cellpuzzle sft`: supervised fine-tuning with TRL + PEFT LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    ARGV,
    ConfigFile,
    Format,
    ModelDir,
    OptionalSeed,
    OutputDir,
    OutputFormat,
    Overrides,
    Overwrite,
    TrustRemoteCode,
    console,
    execute,
    given,
)
from cellpuzzle_cli.runner import Outcome, Request


def sft(
    ctx: typer.Context,
    overrides: Overrides = None,
    output: OutputDir = Path("adapter"),
    model: ModelDir = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Training puzzles: train.jsonl from `split`, or a CellPuzzles JSON/Parquet "
                       "file with system_msg, user_msg, assistant_msg. Default: the latest split's "
                       "train file in the manifest.")] = None,
    config: ConfigFile = None,
    rationale: Annotated[str | None, typer.Option(
        "--rationale", help="Targets without a <think> block get one: 'template' (marker genes "
                            "learned from the training puzzles; with rationale_genes=0 bare "
                            "'Cell i -> type' lines) or 'none' (empty).")] = None,
    curriculum: Annotated[str | None, typer.Option(
        "--curriculum", help="Small puzzles first: stages SIZES:STEPS in order, e.g. "
                             "3:500,3-4:500,3-5:rest (rest: what max_steps leaves). Sets the "
                             "`curriculum` key.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the interrupted (or kept-checkpoint) run for this -o folder.")]
    = False,
    seed: OptionalSeed = None,
    nproc_per_node: Annotated[int, typer.Option(
        "--nproc-per-node", min=1, help="Train on this many processes (torchrun, DDP: gloo on "
                                        "CPU, NCCL on GPUs); only the first writes the output.")]
    = 1,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
    fmt: Format = OutputFormat.human,
) -> None:
    """Supervised fine-tuning with TRL + PEFT LoRA on the assistant turns only.

    Settings come from configs/sft.yaml (Cell-o1's recipe), --config, then key=value overrides.
    For a from-scratch model (init-model --tiny): finetune=full trains every weight and
    completion_only_loss=false puts the loss on the prompt too; merge-lora then copies the
    model folder unchanged.

    Example: cellpuzzle sft --model tiny-model -o adapter max_steps=30 learning_rate=5e-3 lora_r=8

    Example: cellpuzzle sft --nproc-per-node 2 -o adapter max_steps=30
    """
    options = given(ctx, rationale=rationale, seed=seed, curriculum=curriculum)
    flags = {"resume": resume, "nproc_per_node": nproc_per_node,
             "trust_remote_code": trust_remote_code, "argv": ARGV.get()}
    execute(ctx, Request("sft", {"base_model": model, "train": data}, output, options,
                         overrides or [], config, overwrite, flags), fmt, _print_result)


def _print_result(outcome: Outcome) -> None:
    result, finetune = outcome.result, outcome.result.finetune
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    what = "Fine-tuned model" if finetune == "full" else "Adapter"
    console.print(f"[bold green]{what} written to {result.out}[/bold green] (curves: "
                  f"{result.out}/curves.png, metrics.jsonl)")
    console.print(f"  base model   {result.base_model}")
    console.print(f"  puzzles      {result.n_train} train, {result.n_eval} eval "
                  f"(targets: {result.rationale_counts})")
    console.print(f"  steps        {result.steps} in {result.runtime_s:.1f}s on {result.device}"
                  f"{' (bf16)' if result.bf16 else ''}"
                  f"{f', resumed from {result.resumed_from}' if result.resumed_from else ''}")
    console.print(f"  train loss   {fmt(result.train_loss)} mean "
                  f"(first logged {fmt(result.first_loss)}, last {fmt(result.last_loss)})")
    console.print(f"  eval loss    {fmt(result.eval_loss)}")
    for stage in result.curriculum or []:
        mix = ", ".join(f"N {n}: {count}" for n, count in stage["n_mix"].items())
        console.print(f"  stage {stage['stage']}      N {stage['sizes']}, steps "
                      f"{stage['steps'][0]}-{stage['steps'][1]}, loss {fmt(stage['loss'])} "
                      f"({mix})")
    console.print(f"  trainable    {result.trainable_params:,} "
                  f"{'model' if finetune == 'full' else 'adapter'} parameters")
