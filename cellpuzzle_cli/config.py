"""Settings: one dataclass per step, filled from defaults < YAML file < `key=value` overrides.

Every value, whether it comes from a YAML file, an override or a command-line option, passes
through the same coercion and checks here, before any work starts:

- A settings class lists every valid key, so a misspelt key is refused with the valid ones.
- Values are coerced to the field's type (`5e-5` is a float whether YAML or the shell wrote it).
- Ranges and choices live in the type, with `typing.Annotated` (`Seed`, `Count`, `Rate`, …),
  and a class may add cross-field rules in a `validate()` method.

Each step saves its resolved settings as `<command>.yaml` beside its output (`save_settings`);
the file loads back with `--config` and gives the same settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from cellpuzzle_cli.errors import UserError

T = TypeVar("T")
CONFIG_DIR = Path(__file__).parent / "configs"  # a link to the repository's configs/
SEED_MAX = 2**32 - 1  # numpy and torch seeds
OVERRIDES, OPTIONS = "the command-line overrides", "the command-line options"  # layer names


@dataclass(frozen=True)
class Check:
    """A rule on a value: bounds (inclusive `low`/`high`, exclusive `above`) or `choices`."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    choices: tuple[Any, ...] | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.low is not None and self.high is not None:
            return f"between {_number(self.low)} and {_number(self.high)}"
        parts = []
        if self.above is not None:
            parts.append(f"greater than {_number(self.above)}")
        if self.low is not None:
            parts.append(f"at least {_number(self.low)}")
        if self.high is not None:
            parts.append(f"at most {_number(self.high)}")
        return " and ".join(parts)

    def ok(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, float) and math.isnan(value):
            return False
        return ((self.low is None or value >= self.low) and (self.high is None or value <= self.high)
                and (self.above is None or value > self.above))


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def one_of(*choices: Any) -> Check:
    return Check(choices=tuple(choices))


Seed = Annotated[int, Check(0, SEED_MAX)]
Count = Annotated[int, Check(1)]              # sizes, steps, batch sizes: 1 or more
NonNegative = Annotated[int, Check(0)]
Rate = Annotated[float, Check(above=0)]       # learning rates, temperatures above 0
Fraction = Annotated[float, Check(0, 1)]
Share = Annotated[float, Check(above=0, high=1)]  # top_p, GPU memory share


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading `5e-5` as a number as YAML 1.2 does (1.1 wants `5.0e-5`), so
    files and `key=value` overrides agree on every value; a key given twice in one mapping is
    an error (YAML requires unique keys; PyYAML would silently keep the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, Hashable) and key in lines:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice (lines {lines[key]} and "
                        f"{line}); say it once", key_node.start_mark)
                if isinstance(key, Hashable):
                    lines[key] = line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_value(text: str) -> Any:
    """A command-line value typed the way YAML would read it (`5e-3`, `true`, `[a, b]`, `null`)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


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


def load_yaml(path: Path | str, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from a file (safe loader: YAML tags cannot run code)."""
    from cellpuzzle_cli.io import read_text

    text = read_text(path, what)
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys at the top level.")
    return data


def shipped_config(name: str) -> Path:
    """Path of a config shipped in `configs/` (e.g. `sft.yaml`)."""
    return CONFIG_DIR / name


def unknown_key(key: str, valid: list[str], where: str, prefix: str = "") -> UserError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    names = ", ".join(prefix + v for v in valid)
    return UserError(f"Unknown config key '{prefix}{key}' in {where}.{hint} Valid keys: {names}.")


_TYPE_NAMES = {int: "whole number", float: "number", str: "text", bool: "true or false",
               Path: "path"}


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _article(name: str) -> str:
    return name if name.startswith("true") else ("an " if name[0] in "aeiou" else "a ") + name


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` as `annotation` wants it, or a UserError naming the key and what is allowed."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        value = coerce(value, args[0], key)
        for check in args[1:]:
            if isinstance(check, Check) and value is not None and not check.ok(value):
                raise UserError(f"'{key}' must be {check.describe()}, got {value!r}.")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except UserError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise UserError(f"'{key}' got {value!r}, which is none of "
                        f"{', '.join(_type_name(a) for a in args)}.")
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads `5e-5` as text
        try:
            value = float(value)
        except ValueError:
            pass
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # `inf` is "above 0" and would train a model of NaNs
            raise UserError(f"'{key}' must be a finite number, got {value!r}.")
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation is Path and isinstance(value, (str, Path)):
        return Path(value)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        inner = args[0] if args else Any
        return [v if inner is Any else coerce(v, inner, key) for v in value]
    if annotation is Any:
        return value
    raise UserError(f"'{key}' must be {_article(_type_name(annotation))}, got {value!r}.")


def fields_of(cls: type) -> dict[str, Any]:
    """Field name -> annotation (with its checks) of a settings dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def layer_settings(cls: type[T], file: Path | str | None = None,
                   overrides: Sequence[str] | Mapping[str, Any] = (),
                   options: Mapping[str, Any] | None = None, *, shipped: str | None = None,
                   load: Callable[[list[tuple[str, dict[str, Any]]]], T] | None = None) -> T:
    """A step's settings, layered the one way every step uses: the dataclass defaults <
    `file` (`--config`; else the `shipped` YAML in configs/) < `key=value` `overrides` <
    `options` given on the command line. `load` builds settings that are not plain dataclass
    fields (rl's verl keys) from the same layers."""
    layers: list[tuple[str, dict[str, Any]]] = []
    source = file if file is not None else (shipped_config(shipped) if shipped else None)
    if source is not None:
        layers.append((str(source), load_yaml(source)))
    given = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides))
    layers.append((OVERRIDES, given))
    layers.append((OPTIONS, dict(options or {})))
    return load(layers) if load is not None else from_layers(cls, layers)


def from_layers(cls: type[T], layers: list[tuple[str, dict[str, Any]]], prefix: str = "") -> T:
    """Instance of dataclass `cls` from named layers of values, later layers winning; `prefix`
    is how the keys are spelled to the user (e.g. `cellpuzzle.` for rl's own section)."""
    hints = fields_of(cls)
    values: dict[str, Any] = {}
    for where, layer in layers:
        for key, value in layer.items():
            if key not in hints:
                raise unknown_key(key, sorted(hints), where, prefix)
            values[key] = coerce(value, hints[key], prefix + key)
    return check_settings(cls(**values))


def check_settings(settings: T) -> T:
    """Every field against its type and checks, then the class's own `validate()` rules.

    Services call this too, so settings built in code are held to the same rules."""
    for name, annotation in fields_of(type(settings)).items():
        coerce(getattr(settings, name), annotation, name)
    validate = getattr(settings, "validate", None)
    if callable(validate):
        validate()
    return settings


def settings_dict(settings: Any) -> dict[str, Any]:
    """Settings as plain YAML values; fields marked `metadata={"machine": True}` (worker counts
    and the like, which change no result) are left out so equal runs write equal bytes."""
    out = {}
    for f in dataclasses.fields(settings):
        if f.metadata.get("machine"):
            continue
        value = getattr(settings, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def settings_file(command: str) -> str:
    """`<command>.yaml`, the file name every step saves its resolved settings under."""
    return command.replace(" ", "-") + ".yaml"


def dump_settings(command: str, values: dict[str, Any]) -> bytes:
    header = (f"# cellpuzzle {command}: the resolved settings of this run. Reload them with\n"
              f"# `cellpuzzle {command} --config {settings_file(command)}`.\n")
    return (header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)).encode()


def save_settings(folder: Path, command: str, settings: Any) -> Path:
    """Write `<command>.yaml` (a settings dataclass, or a ready mapping) into `folder`."""
    from cellpuzzle_cli.io import atomic_write_bytes

    values = settings if isinstance(settings, dict) else settings_dict(settings)
    path = Path(folder) / settings_file(command)
    atomic_write_bytes(path, dump_settings(command, values))
    return path
