"""`cellpuzzle predict`: model answers for test puzzles, one resumable JSONL file per shard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    ConfigFile,
    Format,
    ModelDir,
    OptionalOutputDir,
    OptionalSeed,
    OutputFormat,
    Overrides,
    Overwrite,
    TrustRemoteCode,
    console,
    err_console,
    execute,
    given,
)
from cellpuzzle_cli.runner import Outcome, Request


def predict(
    ctx: typer.Context,
    model: ModelDir = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Test puzzles (.jsonl, .json or .parquet). Default: the latest split's test file.")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="Predict shard i of n (i from 0), e.g. 0/4. Default: the whole set (0/1).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="A quick look: only the first N puzzles, in predict's fixed order (by sha256 of the puzzle id, the order shards are dealt in; the same N every time, and a larger N extends them). Recorded as a partial run; run again without it to predict the rest.", show_default=False)] = None,
    output: OptionalOutputDir = None,
    backend: Annotated[str | None, typer.Option("--backend", "-b", help="hf (transformers), vllm (GPU), baseline (marker genes, no model), celltypist (full-expression reference, no model) or auto (vllm when installed with a GPU, else hf).")] = None,
    train: Annotated[Path | None, typer.Option("--train", help="baseline/celltypist: training puzzles. Default: the train file split beside the test data (or Cell-o1's ../train/train_data.json).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts per batch (hf default 16).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Longest answer in tokens.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="0 = greedy (default).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Samples per puzzle (needs --temperature > 0).")] = None,
    seed: OptionalSeed = None,
    max_model_len: Annotated[int | None, typer.Option("--max-model-len", help="Prompt + answer token limit; longer prompts become errors.")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option("--tensor-parallel-size", help="vllm: GPUs per model copy.")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option("--gpu-memory-utilization", help="vllm: fraction of GPU memory to use.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run all --num-shards shards as Ray tasks (one GPU each where there are GPUs).")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster to use (host:port or ray://host:port). Default: start a local Ray.")] = None,
    num_shards: Annotated[int | None, typer.Option("--num-shards", help="With --ray: how many shards to run.")] = None,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="When resuming, predict again the puzzles that failed (e.g. out of memory) last time.")] = False,
    trust_remote_code: TrustRemoteCode = False,
    overrides: Overrides = None,
    fmt: Format = OutputFormat.human,
) -> None:
    """Model answers for test puzzles, one JSONL line per puzzle, resumable.

    Writes OUT/shard-{i}-of-{n}.jsonl. A killed run picks up where it stopped when run again
    (pass --overwrite to start over). Settings come from configs/predict.yaml < --config <
    key=value overrides < options.

    Example: cellpuzzle predict --model sft-model --data splits/test.jsonl --shard 0/2 -o preds

    Example: cellpuzzle predict --backend baseline -o preds-baseline

    Quick look: cellpuzzle predict --model sft-model --limit 5 -o preds-try
    """
    options = given(ctx, backend=backend, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    temperature=temperature, n=n, seed=seed, max_model_len=max_model_len,
                    tensor_parallel_size=tensor_parallel_size,
                    gpu_memory_utilization=gpu_memory_utilization)
    from cellpuzzle_cli.predict.shards import shard_from_options

    flags = {"shard": shard_from_options(shard, ray, num_shards, ray_address), "ray": ray,
             "ray_address": ray_address, "retry_errors": retry_errors,
             "trust_remote_code": trust_remote_code, "limit": limit}
    execute(ctx, Request("predict", {"test": data, "model": model, "train": train}, output,
                         options, overrides or [], config, overwrite, flags), fmt, _summary)


def _summary(outcome: Outcome) -> None:
    from rich.table import Table

    results = outcome.result.results
    table = Table(title="predict", show_lines=False)
    for col in ("shard", "puzzles", "resumed", "new", "errors", "prompts/s", "tokens/s", "file"):
        table.add_column(col, justify="right" if col not in ("shard", "file") else "left")
    for r in results:
        table.add_row(f"{r.shard_index}/{r.num_shards}", str(r.total), str(r.resumed),
                      str(r.generated), str(r.errors), f"{r.prompts_per_s:.2f}",
                      f"{r.tokens_per_s:.1f}", str(r.shard_file))
    console.print(table)
    errors = sum(r.errors for r in results)
    if errors:
        err_console.print(f"[yellow]{errors} puzzle(s) failed and have prediction null with the "
                          "error in the 'error' field (score counts them as wrong).[/yellow]")
