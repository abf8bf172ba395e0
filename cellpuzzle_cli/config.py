"""Dataclass configs from YAML files plus `key=value` overrides.

A config class lists every valid key, so a misspelt key in a file or on the command line is
refused with the list of valid ones instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cellpuzzle_cli.errors import UserError, existing_path

T = TypeVar("T")
CONFIG_DIR = Path(__file__).parent / "configs"  # a link to the repository's configs/


def parse_value(text: str) -> Any:
    """A command-line value typed the way YAML would read it (`5e-3`, `true`, `[a, b]`, `null`)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads `5e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a.b": 1, "c": "x"}`, keeping dotted keys flat."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"'{item}' is not a key=value override. Write it as e.g. "
                            "learning_rate=5e-3 (no spaces around '=').")
        out[key] = parse_value(value)
    return out


def load_yaml(path: Path | str) -> dict[str, Any]:
    path = existing_path(path, "config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys at the top level.")
    return data


def shipped_config(name: str) -> Path:
    """Path of a config shipped in `configs/` (e.g. `sft.yaml`)."""
    return CONFIG_DIR / name


def _unknown_key(key: str, valid: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"Unknown config key '{key}' in {where}.{hint} Valid keys: {', '.join(valid)}.")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Light type checking so `max_steps=ten` fails here, not deep inside a trainer."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"Config key '{key}' got {value!r}, which is not a {annotation}.")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, (str, int, float)):
        return str(value)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return list(value)
    if annotation in (float, int, bool, str):
        raise UserError(f"Config key '{key}' must be a {annotation.__name__}, got {value!r}.")
    return value


def build_config(cls: type[T], file: Path | str | None = None,
                 overrides: dict[str, Any] | None = None, default_file: str | None = None) -> T:
    """Instance of dataclass `cls` from defaults < YAML file (or shipped default) < overrides."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if file is None and default_file is not None:
        file = shipped_config(default_file)
    if file is not None:
        layers.append((str(file), load_yaml(file)))
    layers.append(("the command-line overrides", overrides or {}))
    for where, layer in layers:
        for key, value in layer.items():
            if key not in fields:
                raise _unknown_key(key, sorted(fields), where)
            values[key] = _coerce(value, hints[key], key)
    return cls(**values)

