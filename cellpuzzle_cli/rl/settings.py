"""RL configs: verl's own dotted keys plus a small `cellpuzzle:` section of ours.

A verl user reads `configs/grpo.yaml` as is: every key outside `cellpuzzle:` is a verl
Hydra key (`actor_rollout_ref.actor.optim.lr`), nested or dotted, and `key=value` overrides
use the same names. verl's schema is the judge of which keys exist (see verl_backend); here we
only refuse the legacy reward keys that verl 0.9.1 accepts but never reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from cellpuzzle_cli.config import (
    OPTIONS,
    OVERRIDES,
    Check,
    Count,
    Rate,
    Seed,
    coerce,
    from_layers,
    layer_settings,
    one_of,
)
from cellpuzzle_cli.errors import UserError

ALGORITHMS = ("grpo", "ppo")
BACKENDS = ("verl", "trl")
DEVICES = ("auto", "cpu")
OURS = "cellpuzzle"

# The reward keys verl 0.9.1's main_ppo reads (verl/trainer/ppo/reward.py get_custom_reward_fn).
REWARD_DEFAULTS = {
    "reward.custom_reward_function.path": "pkg://cellpuzzle_cli.reward",
    "reward.custom_reward_function.name": "compute_score",
    "reward.reward_manager.name": "naive",
}
TRAIN_KEY, VAL_KEY = "data.train_files", "data.val_files"
MODEL_KEY, CRITIC_MODEL_KEY = "actor_rollout_ref.model.path", "critic.model.path"
OUTPUT_KEY = "trainer.default_local_dir"
NNODES_KEY, GPUS_KEY = "trainer.nnodes", "trainer.n_gpus_per_node"
RAY_ADDRESS_KEY = "+ray_kwargs.ray_init.address"

_LEGACY = {
    "custom_reward_function": "reward.custom_reward_function",
    "reward_model": "reward.reward_model (model-based rewards) or reward.reward_manager",
    "reward.reward_manager": "reward.reward_manager.name",
}


@dataclass
class Ours:
    """The `cellpuzzle:` section: what verl has no key for."""

    backend: Annotated[str, one_of(*BACKENDS)] = "verl"
    device: Annotated[str, one_of(*DEVICES)] = "auto"  # cpu: verl's trainer on this CPU
    ray_address: str | None = None
    ray_connect_timeout_s: Rate = 5.0
    reward_canary: bool = True  # stop a verl run whose first step did not call our reward
    run_timeout_s: Rate | None = None  # kill a verl run (and its Ray) after this long
    seed: Seed = 0
    logging_steps: Count = 1
    fail_on_flat_reward: bool = False  # TRL: exit 2 when no group's rewards ever differed
    curriculum: str | None = None  # stages by N, e.g. 3-5:40,3-8:rest (cellpuzzle_cli.curriculum)

    def validate(self) -> None:
        if self.curriculum is not None:
            from cellpuzzle_cli.curriculum import parse_plan

            parse_plan(self.curriculum, f"{OURS}.curriculum")


# verl keys whose values cellpuzzle reads itself (batch arithmetic, the TRL plan): checked here,
# so `total_training_steps=-3` fails at once instead of training for an unbounded time.
CHECKED_KEYS: dict[str, Any] = {
    "trainer.total_training_steps": Count | None,
    "trainer.total_epochs": Count,
    "trainer.nnodes": Count,
    "trainer.n_gpus_per_node": Count,
    "data.train_batch_size": Count,
    "data.max_prompt_length": Count,
    "data.max_response_length": Count,
    "actor_rollout_ref.rollout.n": Count,
    "actor_rollout_ref.rollout.temperature": Annotated[float, Check(0)],
    "actor_rollout_ref.actor.ppo_mini_batch_size": Count,
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": Count,
    "actor_rollout_ref.actor.ppo_epochs": Count,
    "actor_rollout_ref.actor.optim.lr": Rate,
}


@dataclass
class RLSettings:
    algorithm: str
    ours: Ours
    verl: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        for k in (key, "+" + key, "++" + key):
            if k in self.verl:
                return self.verl[k]
        return default

    def has(self, key: str) -> bool:
        return any(k in self.verl for k in (key, "+" + key, "++" + key))


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML mappings to dotted keys; empty mappings stay values."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def bare_key(key: str) -> str:
    return key.lstrip("+~")


def check_legacy(key: str) -> None:
    """verl 0.9.1 composes these without error but never reads them (or crashes on them)."""
    bare = bare_key(key)
    for old, new in _LEGACY.items():
        if bare == old or bare.startswith(old + "."):
            if old == "reward.reward_manager" and bare != old:
                continue
            raise UserError(
                f"'{key}' is a legacy verl reward key: verl 0.9.1's trainer composes it but never "
                f"reads it, so the run would silently use the wrong reward. Use {new} instead "
                "(cellpuzzle already sets reward.custom_reward_function.path/name and "
                "reward.reward_manager.name to its own reward).")


def from_layers_of(algorithm: str, layers: list[tuple[str, dict[str, Any]]]) -> RLSettings:
    """RL settings from the runner's layers: a YAML file holds verl keys (nested or dotted) and
    a `cellpuzzle:` section; overrides and options hold dotted keys, ours as `cellpuzzle.KEY`."""
    verl: dict[str, Any] = {}
    ours_layers: list[tuple[str, dict[str, Any]]] = []
    source = ""
    for where, layer in layers:
        layer = dict(layer)
        from_file = where not in (OVERRIDES, OPTIONS)
        if from_file:
            source = where
            section = layer.pop(OURS, None) or {}
            if not isinstance(section, dict):
                raise UserError(f"The '{OURS}' section of {where} must be a mapping.")
            ours_layers.append((where, section))
            layer = flatten(layer)
        dotted = {k[len(OURS) + 1:]: layer.pop(k) for k in list(layer) if k.startswith(OURS + ".")}
        if dotted:
            ours_layers.append((where, dotted))
        verl.update(layer)
    for key in verl:
        check_legacy(key)
    for key, annotation in CHECKED_KEYS.items():
        for spelling in (key, "+" + key, "++" + key):
            if spelling in verl:
                verl[spelling] = coerce(verl[spelling], annotation, key)
    ours = from_layers(Ours, ours_layers, prefix=OURS + ".")
    return RLSettings(algorithm=algorithm, ours=ours, verl=verl, source=source)


def load_grpo(layers: list[tuple[str, dict[str, Any]]]) -> RLSettings:
    return from_layers_of("grpo", layers)


def load_ppo(layers: list[tuple[str, dict[str, Any]]]) -> RLSettings:
    return from_layers_of("ppo", layers)


def load_settings(algorithm: str, file: Path | None = None,
                  overrides: dict[str, Any] | None = None) -> RLSettings:
    """The settings `rl ALGORITHM --config FILE key=value…` would run with."""
    if algorithm not in ALGORITHMS:
        raise UserError(f"Unknown RL algorithm '{algorithm}'. Use one of {', '.join(ALGORITHMS)}.")
    return layer_settings(RLSettings, file, overrides or {}, shipped=f"{algorithm}.yaml",
                          load=lambda layers: from_layers_of(algorithm, layers))


def saved_settings(settings: RLSettings) -> dict[str, Any]:
    """What `rl` saves as rl-grpo.yaml / rl-ppo.yaml: our section and every verl key, as a file
    `--config` reads back."""
    from cellpuzzle_cli.config import settings_dict

    return {OURS: settings_dict(settings.ours), **settings.verl}


def set_default(settings: RLSettings, key: str, value: Any) -> None:
    if not settings.has(key):
        settings.verl[key] = value


def set_key(settings: RLSettings, key: str, value: Any) -> None:
    """Set `key` to `value`, replacing it under any `+`/`++` spelling it already has."""
    bare = bare_key(key)
    for k in (bare, "+" + bare, "++" + bare):
        settings.verl.pop(k, None)
    settings.verl[key] = value


_KEYWORDS = {"true", "false", "null", "inf", "nan", "yes", "no", "on", "off"}


def hydra_value(value: Any) -> str:
    """A Python value as Hydra override grammar reads it back unchanged."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_/][\w./:@\-]*", text) and text.lower() not in _KEYWORDS:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def to_overrides(verl: dict[str, Any]) -> list[str]:
    """Hydra override strings, `key=value`, one per key, in insertion order."""
    out = []
    for key, value in verl.items():
        out.append(key if key.startswith("~") and value is None else f"{key}={hydra_value(value)}")
    return out
