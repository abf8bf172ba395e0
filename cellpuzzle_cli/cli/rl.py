"""`cellpuzzle rl grpo|ppo`: reinforcement learning with verl (Ray) or TRL (one machine)."""

from __future__ import annotations

import shlex
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
    console,
    err_console,
    execute,
    given,
)
from cellpuzzle_cli.runner import Outcome, Request

app = typer.Typer(no_args_is_help=True)

Backend = Annotated[str | None, typer.Option(
    "--backend", help="verl (Ray, GPUs; the default) or trl (one machine, CPU or one GPU). "
                      "Overrides cellpuzzle.backend in the config.", show_default=False)]
Device = Annotated[str | None, typer.Option(
    "--device", help="auto (verl: the cluster's GPUs; trl: CUDA if present) or cpu: verl's real "
                     "trainer on this machine's CPU through cellpuzzle's verl plugin, for a smoke "
                     "run of the same job on a tiny model (it sets the CPU keys itself). "
                     "Overrides cellpuzzle.device.", show_default=False)]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Compose verl's own config with your keys, run its checks, print the "
                      "command, and stop.")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", help="An existing Ray cluster (HOST:PORT or ray://HOST:10001); checked with "
                          "a bounded connect first. Default: verl starts a local Ray.",
    show_default=False)]
Nnodes = Annotated[int | None, typer.Option("--nnodes", help="trainer.nnodes.", show_default=False)]
Gpus = Annotated[int | None, typer.Option("--gpus-per-node", help="trainer.n_gpus_per_node.",
                                             show_default=False)]
Data = Annotated[Path | None, typer.Option(
    "--data", help="Training Parquet (verl RL schema). Default: the latest to-parquet 'train'.",
    show_default=False)]
ValData = Annotated[Path | None, typer.Option(
    "--val-data", help="Validation Parquet. Default: the latest to-parquet 'val'.", show_default=False)]
FailOnFlat = Annotated[bool | None, typer.Option(
    "--fail-on-flat-reward/--no-fail-on-flat-reward",
    help="TRL: exit 2 (writing nothing) when no group's rewards ever differed, i.e. GRPO left "
         "the model unchanged. Default: a loud warning (cellpuzzle.fail_on_flat_reward).",
    show_default=False)]
Curriculum = Annotated[str | None, typer.Option(
    "--curriculum", help="Small puzzles first: stages SIZES:LENGTH in order, LENGTH steps, "
                         "rest, or (TRL) reward>=X/W (the mean reward of the last W steps), "
                         "e.g. '3-4:20|reward>=0.5/5,3-5:rest'. verl: steps only, read from an "
                         "ordered file. Overrides cellpuzzle.curriculum.", show_default=False)]


GRPO_HELP = """GRPO with the CellPuzzles reward (Cell-o1's settings: configs/grpo.yaml).

    Keys are verl's own dotted names; `cellpuzzle.KEY=…` sets our section.

    Examples:
    [bold]cellpuzzle rl grpo --dry-run actor_rollout_ref.rollout.n=8[/bold]
    [bold]cellpuzzle rl grpo --backend trl trainer.total_training_steps=3 -o rl-trl[/bold]
    [bold]cellpuzzle rl grpo --device cpu --model tiny-model trainer.total_training_steps=2[/bold]
    """

PPO_HELP = """PPO with a critic, on verl only (Cell-o1's settings: configs/ppo.yaml).

    Example: [bold]cellpuzzle rl ppo --dry-run --nnodes 2 --gpus-per-node 8[/bold]
    """


def rl_command(
    ctx: typer.Context,
    overrides: Overrides = None,
    config: ConfigFile = None,
    backend: Backend = None,
    device: Device = None,
    dry_run: DryRun = False,
    ray_address: RayAddress = None,
    nnodes: Nnodes = None,
    gpus_per_node: Gpus = None,
    data: Data = None,
    val_data: ValData = None,
    model: ModelDir = None,
    output: OptionalOutputDir = None,
    seed: OptionalSeed = None,
    fail_on_flat_reward: FailOnFlat = None,
    curriculum: Curriculum = None,
    overwrite: Overwrite = False,
    fmt: Format = OutputFormat.human,
) -> None:
    """`rl grpo` and `rl ppo` (the algorithm is the subcommand's name)."""
    ours = given(ctx, backend=backend, device=device, ray_address=ray_address, seed=seed,
                 fail_on_flat_reward=fail_on_flat_reward, curriculum=curriculum)
    options = {f"cellpuzzle.{key}": value for key, value in ours.items()}
    flags = {"dry_run": dry_run, "nnodes": nnodes, "gpus_per_node": gpus_per_node}
    execute(ctx, Request(f"rl {ctx.command.name}", {"train": data, "val": val_data,
                                                      "model": model},
                         output, options, overrides or [], config, overwrite, flags), fmt, _show)


def _show(outcome: Outcome) -> None:
    result = outcome.result
    if result.dry_run:
        _print_dry_run(result)
    elif result.exit_code != 0:
        err_console.print(f"[red]verl exited with code {result.exit_code}[/red]; see its log "
                          "above.")
    else:
        _print_result(result)


def _print_stages(stages: list[dict] | None) -> None:
    """A curriculum's stages: as planned (dry run) or as trained."""
    for stage in stages or []:
        if "plan" in stage:
            console.print(f"  stage {stage['stage']}: {stage['plan']}", highlight=False)
            continue
        mix = ", ".join(f"N {n}: {count}" for n, count in stage["n_mix"].items())
        reward = stage.get("reward")
        console.print(f"  stage {stage['stage']}: N {stage['sizes']}, steps {stage['steps'][0]}-"
                      f"{stage['steps'][1]} ({mix})"
                      + ("" if reward is None else f", mean reward {reward:.3f}")
                      + (f", ended by {stage['ended_by']}" if "ended_by" in stage else ""),
                      highlight=False)


def _print_dry_run(result) -> None:
    if result.curriculum:
        console.print("[green]Curriculum[/green] (stages in order):")
        _print_stages(result.curriculum)
    if result.command:
        console.print("[green]verl accepted the config.[/green] Command:")
        console.print(shlex.join(result.command), soft_wrap=True, highlight=False, markup=False)
    else:
        console.print("[green]TRL GRPOConfig[/green] (from the verl keys):")
        for key, value in (result.grpo_args or {}).items():
            console.print(f"  {key} = {value!r}", highlight=False, markup=False)


def _print_result(result) -> None:
    if result.backend == "trl":
        rewards = ", ".join(f"{r:.3f}" for r in result.rewards)
        console.print(f"[green]GRPO (TRL)[/green] {result.steps} step(s); reward per logged step: "
                      f"{rewards or 'none logged'}; model -> {result.output} (curves: "
                      f"{result.output}/curves.png, metrics.jsonl)")
        health = result.summary.get("reward_health") or {}
        if health.get("reward_first_fifth") is not None:
            first, last = health["reward_first_fifth"], health["reward_last_fifth"]
            console.print(f"Mean reward, first fifth of the rounds -> last fifth: {first:.3f} -> "
                          f"{last:.3f} ({'rising' if last > first else 'not rising'}).")
        _print_stages(result.curriculum)
    else:
        if result.reward_calls is not None:
            console.print(f"Reward canary: verl called cellpuzzle's reward "
                          f"({result.reward_calls} call(s) logged).")
        console.print(f"[green]verl finished.[/green] Checkpoints in {result.output}; convert one "
                      f"with `cellpuzzle convert-ckpt {result.output}`.")
        _print_stages(result.curriculum)


app.command("grpo", help=GRPO_HELP)(rl_command)
app.command("ppo", help=PPO_HELP)(rl_command)
