"""Ontology terms offline: labels and ancestor sets from the files `cellxgene-ontology-guide` ships.

CELLxGENE data names cell types, tissues, diseases … by ontology term IDs (`CL:0000624`,
`UBERON:0000178`, `MONDO:0007915`). The `cellxgene-ontology-guide` wheel carries each ontology
it supports as a compressed JSON file (term → label, ancestors), so labels and ancestry need no
network. When the wheel ships several releases of one ontology, the newest is used.

Used by build-context (labels for files that hold only `*_ontology_term_id` columns) and by
score (hierarchical metrics over the Cell Ontology).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError

CL_ROOT = "CL:0000000"          # "cell": every cell type's ancestor, so it carries no information
ID_SUFFIX = "_ontology_term_id"  # CELLxGENE's column naming: <field>_ontology_term_id
_TERM = re.compile(r"^([A-Za-z][A-Za-z0-9]*):[A-Za-z0-9_]+$")
_FILE = re.compile(r"^(?P<prefix>[A-Za-z]+)-ontology-(?P<version>.+)\.json\.zst$")
# Term prefixes whose terms live in another ontology's file.
_HOSTED_BY = {"AfPO": "HANCESTRO", "ZFS": "ZFA"}
# Values CELLxGENE allows in ID columns that are not terms.
_PLAIN = {"unknown": "unknown", "na": "na", "multiethnic": "multiethnic"}

_INSTALL_HINT = ("Install it with `pip install cellxgene-ontology-guide` (it is part of "
                 "cellpuzzle's `dev` and `eval` extras).")


def is_term_id(value: str) -> bool:
    """Whether `value` looks like an ontology term ID (`PREFIX:LOCAL`)."""
    return bool(_TERM.match(value.strip()))


def _data_dir() -> Path:
    try:
        from cellxgene_ontology_guide._constants import DATA_ROOT
    except ImportError as exc:
        raise UserError("Ontology term IDs need the Cell Ontology and its siblings, which come "
                        f"with the `cellxgene-ontology-guide` package, not installed here. "
                        f"{_INSTALL_HINT}") from exc
    return Path(DATA_ROOT)


def _version_key(version: str) -> tuple:
    """Orders 'v2025-07-30', '2026-01-06', 'v3.90.0', '3.0' numerically."""
    return tuple(int(p) for p in re.findall(r"\d+", version))


@lru_cache(maxsize=1)
def ontology_files() -> dict[str, Path]:
    """The newest shipped file per ontology prefix (CL, UBERON, MONDO, PATO, HsapDv, …)."""
    newest: dict[str, tuple[tuple, Path]] = {}
    for path in _data_dir().glob("*.json.zst"):
        m = _FILE.match(path.name)
        if m is None:
            continue
        key = _version_key(m["version"])
        if m["prefix"] not in newest or key > newest[m["prefix"]][0]:
            newest[m["prefix"]] = (key, path)
    return {prefix: path for prefix, (_, path) in sorted(newest.items())}


@cache
def _terms(prefix: str) -> dict[str, Any]:
    """Term ID → record (label, ancestors …) of one ontology; {} when none is shipped."""
    path = ontology_files().get(_HOSTED_BY.get(prefix, prefix))
    if path is None:
        return {}
    from cellxgene_ontology_guide.supported_versions import load_ontology_file

    return load_ontology_file(path.name)


def term_label(term_id: str) -> str | None:
    """The term's label, or None when no shipped ontology knows it."""
    term_id = term_id.strip()
    if term_id.lower() in _PLAIN:
        return _PLAIN[term_id.lower()]
    m = _TERM.match(term_id)
    if m is None:
        return None
    record = _terms(m.group(1)).get(term_id)
    return str(record["label"]) if record and record.get("label") else None


@dataclass
class CellOntology:
    """Cell Ontology ancestry and label lookup, with the answers cached per term."""

    terms: dict[str, Any]
    source: str
    _ancestors: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    _by_label: dict[str, str] | None = field(default=None, repr=False)

    @classmethod
    def load(cls) -> CellOntology:
        path = ontology_files().get("CL")
        if path is None:
            raise UserError(f"The installed cellxgene-ontology-guide ships no Cell Ontology "
                            f"file. Reinstall it: {_INSTALL_HINT}")
        return cls(_terms("CL"), path.name.removesuffix(".json.zst"))

    def knows(self, term_id: str) -> bool:
        return term_id in self.terms

    def ancestors(self, term_id: str) -> frozenset[str]:
        """The term and its Cell Ontology ancestors, without the root `cell` (empty if unknown).

        Only CL terms count: relations into other ontologies (an anatomical part, say) are not
        cell types, and the root is shared by every pair, so it would only inflate overlap.
        """
        if term_id not in self._ancestors:
            record = self.terms.get(term_id)
            if record is None:
                found: frozenset[str] = frozenset()
            else:
                found = frozenset(a for a in [term_id, *record.get("ancestors", {})]
                                  if a.startswith("CL:") and a != CL_ROOT)
            self._ancestors[term_id] = found
        return self._ancestors[term_id]

    def id_for_label(self, label: str) -> str | None:
        """The CL term whose label is `label` (case-insensitive), skipping obsolete terms."""
        if self._by_label is None:
            self._by_label = {}
            for term_id, record in self.terms.items():
                if record.get("deprecated") or not record.get("label"):
                    continue
                self._by_label.setdefault(str(record["label"]).lower(), term_id)
        return self._by_label.get(label.strip().lower())

    def label(self, term_id: str) -> str | None:
        record = self.terms.get(term_id)
        return str(record["label"]) if record else None
