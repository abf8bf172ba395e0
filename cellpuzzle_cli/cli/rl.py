"""`cellpuzzle rl grpo|ppo`: reinforcement learning with verl (Ray) or TRL (one machine)."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented

app = typer.Typer(no_args_is_help=True)


@app.command("grpo")
def grpo(ctx: typer.Context) -> None:
    """GRPO: group-relative policy optimisation with the CellPuzzles reward."""
    not_implemented("rl grpo")


@app.command("ppo")
def ppo(ctx: typer.Context) -> None:
    """PPO with a critic (verl only)."""
    not_implemented("rl ppo")
