"""`cellpuzzle predict`: model answers for test puzzles, one resumable JSONL file per shard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cellpuzzle_cli.cli.common import (
    RL_COMMANDS,
    ConfigFile,
    OptionalOutputDir,
    Overrides,
    Overwrite,
    TrustRemoteCode,
    console,
    err_console,
    input_or_latest,
    manifest,
    progress_bar,
    record,
    start,
)
from cellpuzzle_cli.errors import UserError

MODEL_COMMANDS = ("merge-lora", "convert-ckpt", *RL_COMMANDS, "init-model")


def _options(**given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None}


def predict(
    ctx: typer.Context,
    model: Annotated[Path | None, typer.Option("--model", help="Hugging Face model folder. Default: the latest model from merge-lora, convert-ckpt, rl or init-model in the manifest.")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Test puzzles (.jsonl, .json or .parquet). Default: the latest split's test file.")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="Predict shard i of n (i from 0), e.g. 0/4. Default: the whole set (0/1).")] = None,
    output: OptionalOutputDir = None,
    backend: Annotated[str | None, typer.Option("--backend", "-b", help="hf (transformers), vllm (GPU), baseline (marker genes, no model) or auto (vllm when installed with a GPU, else hf).")] = None,
    train: Annotated[Path | None, typer.Option("--train", help="baseline only: training puzzles. Default: the train file split beside the test data.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts per batch (hf default 16).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Longest answer in tokens.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="0 = greedy (default).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Samples per puzzle (needs --temperature > 0).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")] = None,
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
) -> None:
    """Model answers for test puzzles, one JSONL line per puzzle, resumable.

    Writes OUT/shard-{i}-of-{n}.jsonl. A killed run picks up where it stopped when run again
    (pass --overwrite to start over). Settings come from configs/predict.yaml < --config <
    key=value overrides < options.

    Example: cellpuzzle predict --model sft-model --data splits/test.jsonl --shard 0/2 -o preds

    Example: cellpuzzle predict --backend baseline -o preds-baseline
    """
    from cellpuzzle_cli.config import build_config, parse_overrides
    from cellpuzzle_cli.predict import PredictConfig, PredictSettings, parse_shard
    from cellpuzzle_cli.predict.backends import resolve_backend
    from cellpuzzle_cli.predict.records import cello1_train_file
    from cellpuzzle_cli.predict.settings import TRAINED_BACKENDS

    started = start()
    values = parse_overrides(overrides)
    values.update(_options(backend=backend, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           temperature=temperature, n=n, seed=seed, max_model_len=max_model_len,
                           tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization))
    cfg = build_config(PredictConfig, config, values, default_file="predict.yaml")
    if ray:
        if shard is not None:
            raise UserError("--ray runs every shard itself: drop --shard and give --num-shards N.")
        if num_shards is None:
            raise UserError("--ray needs --num-shards N: the number of shards to run as Ray tasks "
                            "(e.g. one per GPU).")
        spec = parse_shard(f"0/{num_shards}")
    else:
        if num_shards is not None or ray_address is not None:
            raise UserError("--num-shards and --ray-address go with --ray. Without --ray, run one "
                            "shard per command with --shard i/n.")
        spec = parse_shard(shard)
    chosen = resolve_backend(cfg.backend)
    data = input_or_latest(ctx, data, "split", "test data", name="test")
    m = manifest(ctx)
    if chosen in TRAINED_BACKENDS:
        if train is None:
            train = m.find_sibling_output(data, "train")
        if train is None and (train := cello1_train_file(data)) is not None:
            err_console.print(f"[dim]Training puzzles: {train} (Cell-o1's layout, "
                              "../train/train_data.json beside the test file).[/dim]")
        if train is None:
            train = m.latest_output("split", "train")
        if train is None:
            raise UserError(f"--backend {chosen} learns from training puzzles, and the manifest "
                            "records no split to take them from. Pass --train FILE.")
        model = None
    else:
        model = input_or_latest(ctx, model, MODEL_COMMANDS, "model", name="model")
    out = output or Path("predictions") / (chosen if model is None else Path(model).name)
    expression = m.latest_inputs("build-context", "h5ad") if chosen == "celltypist" else []
    settings = PredictSettings(data=data, output_dir=out, model=model, train=train,
                               expression=expression,
                               shard_index=spec.index, num_shards=spec.count, overwrite=overwrite,
                               retry_errors=retry_errors,
                               trust_remote_code=trust_remote_code, config=cfg)
    settings.config.backend = chosen

    if ray:
        from cellpuzzle_cli.predict.ray_launch import run_on_ray

        with progress_bar("Ray shards", unit="shards") as update:
            results, failures = run_on_ray(settings, spec.count, ray_address, update)
    else:
        from cellpuzzle_cli.predict import run_predict

        with progress_bar(f"Predicting shard {spec}", unit="puzzles") as update:
            results, failures = [run_predict(settings, update)], []
    for result in results:
        _record(ctx, settings, result, started)
    _summary(results)
    if failures:
        index, exc = failures[0]
        if isinstance(exc, UserError):
            raise exc
        raise UserError(f"{len(failures)} of {spec.count} Ray shard(s) failed (first: shard "
                        f"{index}: {type(exc).__name__}: {exc}). The finished shards are "
                        "recorded; run the command again to resume the rest.")


def _record(ctx: typer.Context, settings, result, started: float) -> None:
    from dataclasses import asdict

    from cellpuzzle_cli.manifest import Artifact
    from cellpuzzle_cli.predict.settings import TRAINED_BACKENDS

    m = manifest(ctx)
    inputs = [Artifact(Path(settings.data), "test")]
    if result.backend in TRAINED_BACKENDS:
        inputs.append(Artifact(Path(settings.train), "train"))
    else:
        inputs.append(Artifact(Path(settings.model), "model"))
    params = {
        "output_dir": m.relative(result.output_dir), "num_shards": result.num_shards,
        "shard_index": result.shard_index, "complete": True, "backend": result.backend,
        "model": result.model, "puzzles": result.total, "errors": result.errors,
        "resumed": result.resumed, "config": asdict(settings.config),
        "trust_remote_code": settings.trust_remote_code,
    }
    record(ctx, "predict", params, started, inputs,
           [Artifact(result.shard_file, "predictions")])


def _summary(results) -> None:
    from rich.table import Table

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
