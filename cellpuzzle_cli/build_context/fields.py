"""Context fields: which obs columns become sentences, and the paragraph rendered from them.

The wording lives in `configs/context_fields.yaml`, so a curator changes sentences without
touching code. A paragraph depends on donor/sample metadata only, so it is rendered once per
distinct combination of values, not once per cell.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cellpuzzle_cli.build_context.h5ad import Coded
from cellpuzzle_cli.config import load_yaml, shipped_config
from cellpuzzle_cli.errors import UserError

CORE_COLUMNS = ("cell_id", "dataset", "donor_id", "batch_id", "cell_type", "top_genes", "context")


@dataclass(frozen=True)
class Field:
    """One obs column turned into one sentence."""

    column: str
    sentence: str
    values: dict[str, str] = field(default_factory=dict)
    sentences: dict[str, str] = field(default_factory=dict)

    def render(self, value: str) -> str:
        if value in self.sentences:
            return self.sentences[value]
        return self.sentence.format(value=self.values.get(value, value))


@dataclass(frozen=True)
class DatasetRule:
    """Extra wording for the datasets whose name matches `match`."""

    match: str
    text: str | None = None
    fields: tuple[Field, ...] = ()

    def applies(self, dataset: str) -> bool:
        return (fnmatch.fnmatch(dataset, self.match)
                or fnmatch.fnmatch(PurePosixPath(dataset).name, self.match))


@dataclass(frozen=True)
class ContextFields:
    """The parsed context-fields YAML."""

    fields: tuple[Field, ...]
    datasets: tuple[DatasetRule, ...]
    skip_values: frozenset[str]
    fallback: str
    source: str

    def columns(self) -> list[str]:
        """Every column any rule mentions: the output schema is the same for every file."""
        cols = [f.column for f in self.fields]
        cols += [f.column for rule in self.datasets for f in rule.fields]
        return list(dict.fromkeys(cols))

    def for_dataset(self, dataset: str) -> tuple[list[str], list[Field]]:
        texts = [r.text for r in self.datasets if r.applies(dataset) and r.text]
        extra = [f for r in self.datasets if r.applies(dataset) for f in r.fields]
        seen: dict[str, Field] = {}
        for f in [*self.fields, *extra]:
            seen.setdefault(f.column, f)
        return texts, list(seen.values())

    def skip(self, value: str) -> bool:
        return value.strip().lower() in self.skip_values


_TOP_KEYS = ("skip_values", "fallback", "fields", "extra_fields", "datasets")
_FIELD_KEYS = ("column", "sentence", "values", "sentences")
_RULE_KEYS = ("match", "text", "fields")


def load_context_fields(path: Path | None = None) -> ContextFields:
    """Read and validate a context-fields YAML (the shipped one when `path` is None)."""
    path = Path(path) if path is not None else shipped_config("context_fields.yaml")
    data = load_yaml(path)
    _no_unknown(data, _TOP_KEYS, f"{path}")
    fields = [_field(x, path) for x in _list(data, "fields", path)]
    fields += [_field(x, path) for x in _list(data, "extra_fields", path)]
    rules = []
    for raw in _list(data, "datasets", path):
        if not isinstance(raw, dict) or not isinstance(raw.get("match"), str):
            raise UserError(f"{path}: every entry under `datasets` needs a `match` glob, e.g. "
                            "`- match: \"kang2018*\"`.")
        _no_unknown(raw, _RULE_KEYS, f"{path}, dataset rule '{raw['match']}'")
        rules.append(DatasetRule(raw["match"], raw.get("text"),
                                 tuple(_field(x, path) for x in raw.get("fields") or [])))
    cfg = ContextFields(tuple(fields), tuple(rules),
                        frozenset(str(v).strip().lower() for v in data.get("skip_values") or []),
                        str(data.get("fallback") or ""), str(path))
    clash = sorted(set(cfg.columns()) & set(CORE_COLUMNS))
    if clash:
        raise UserError(f"{path}: context field column(s) {', '.join(clash)} clash with output "
                        f"columns of the same name ({', '.join(CORE_COLUMNS)}). Remove them.")
    return cfg


def _list(data: dict, key: str, path: Path) -> list:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise UserError(f"{path}: `{key}` must be a list.")
    return value


def _no_unknown(data: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}. Valid keys: "
                        f"{', '.join(allowed)}.")


def _field(raw: Any, path: Path) -> Field:
    if not isinstance(raw, dict) or "column" not in raw or "sentence" not in raw:
        raise UserError(f"{path}: every field needs `column` and `sentence`, e.g. "
                        "`- {column: sex, sentence: \"The donor is {value}.\"}` (got "
                        f"{raw!r}).")
    _no_unknown(raw, _FIELD_KEYS, f"{path}, field '{raw['column']}'")
    sentence = str(raw["sentence"])
    try:
        sentence.format(value="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"{path}: the sentence for '{raw['column']}' may only use {{value}} as a "
                        f"placeholder ({exc!r}); write literal braces as {{{{ and }}}}.") from exc
    as_map = {k: raw.get(k) or {} for k in ("values", "sentences")}
    for key, value in as_map.items():
        if not isinstance(value, dict):
            raise UserError(f"{path}: `{key}` of field '{raw['column']}' must be a mapping.")
    return Field(str(raw["column"]), sentence,
                 {str(k): str(v) for k, v in as_map["values"].items()},
                 {str(k): str(v) for k, v in as_map["sentences"].items()})


def render_contexts(file_fields: list[Field], field_codes: dict[str, Coded], texts: list[str],
                    fields: ContextFields, n: int) -> Coded:
    """Context paragraph per cell as (codes, paragraphs): rendered once per value combination."""
    present = [f for f in file_fields if f.column in field_codes]
    if not present:
        return np.zeros(n, dtype=np.int32), np.asarray([" ".join(texts) or fields.fallback],
                                                       dtype=object)
    codes = [field_codes[f.column][0].astype(np.int64) + 1 for f in present]
    sizes = [field_codes[f.column][1].size + 1 for f in present]
    if int(np.prod([float(s) for s in sizes])) < 2**62:
        key = np.zeros(n, dtype=np.int64)
        for c, s in zip(codes, sizes):
            key = key * s + c
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    else:
        _, first, inverse = np.unique(np.stack(codes, axis=1), axis=0, return_index=True,
                                      return_inverse=True)
    paragraphs = []
    for row in first:
        sentences = list(texts)
        for f, c in zip(present, codes):
            if c[row] == 0:
                continue
            value = field_codes[f.column][1][c[row] - 1]
            if not fields.skip(value):
                sentences.append(f.render(value))
        paragraphs.append(" ".join(sentences) or fields.fallback)
    return inverse.reshape(-1).astype(np.int32), np.asarray(paragraphs, dtype=object)
