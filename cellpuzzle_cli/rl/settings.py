"""RL configs: verl's own dotted keys plus a small `cellpuzzle:` section of ours.

A verl user reads `configs/grpo.yaml` as is: every key outside `cellpuzzle:` is a verl
Hydra key (`actor_rollout_ref.actor.optim.lr`), nested or dotted, and `key=value` overrides
use the same names. verl's schema is the judge of which keys exist (see verl_backend); here we
only refuse the legacy reward keys that verl 0.9.1 accepts but never reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellpuzzle_cli.config import load_yaml, shipped_config
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

    backend: str = "verl"
    device: str = "auto"  # auto: verl on the cluster's GPUs; cpu: verl's trainer on this CPU
    ray_address: str | None = None
    ray_connect_timeout_s: float = 5.0
    reward_canary: bool = True  # stop a verl run whose first step did not call our reward
    run_timeout_s: float | None = None  # kill a verl run (and its Ray) after this long
    seed: int = 0
    logging_steps: int = 1


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


def _ours(values: dict[str, Any], where: str) -> dict[str, Any]:
    valid = {f.name: f for f in dataclasses.fields(Ours)}
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"Unknown key '{OURS}.{key}' in {where}.{hint} The {OURS} section "
                            f"takes: {', '.join(valid)}.")
    return values


def load_settings(algorithm: str, file: Path | None, overrides: dict[str, Any]) -> RLSettings:
    """Shipped or given YAML, then `key=value` overrides (verl keys, or `cellpuzzle.KEY`)."""
    if algorithm not in ALGORITHMS:
        raise UserError(f"Unknown RL algorithm '{algorithm}'. Use one of {', '.join(ALGORITHMS)}.")
    path = Path(file) if file is not None else shipped_config(f"{algorithm}.yaml")
    raw = load_yaml(path)
    ours_raw = raw.pop(OURS, None) or {}
    if not isinstance(ours_raw, dict):
        raise UserError(f"The '{OURS}' section of {path} must be a mapping.")
    ours_values = _ours(dict(ours_raw), str(path))
    verl = flatten(raw)
    for key, value in overrides.items():
        if key.startswith(OURS + "."):
            ours_values.update(_ours({key[len(OURS) + 1:]: value}, "the command-line overrides"))
        else:
            verl[key] = value
    for key in verl:
        check_legacy(key)
    ours = Ours(**ours_values)
    if ours.backend not in BACKENDS:
        raise UserError(f"Unknown backend '{ours.backend}'. Use one of {', '.join(BACKENDS)}.")
    if ours.device not in DEVICES:
        raise UserError(f"Unknown device '{ours.device}'. Use one of {', '.join(DEVICES)}.")
    return RLSettings(algorithm=algorithm, ours=ours, verl=verl, source=str(path))


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
