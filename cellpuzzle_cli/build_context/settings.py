"""The options of one build-context run, kept apart so every context module can read them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cellpuzzle_cli.config import Count, Seed
from cellpuzzle_cli.errors import UserError

# Knobs that change how fast, never what: left out of the saved build-context.yaml.
MACHINE = {"machine": True}


def donor_pattern(regex: str) -> re.Pattern[str]:
    """`--donor-from-id`'s regex, compiled; it must have a group (the donor)."""
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise UserError(f"--donor-from-id '{regex}' is not a valid regular expression ({exc}). "
                        "Write e.g. --donor-from-id '^([^_]+)_' for ids like MGH36_A01.") from exc
    if pattern.groups < 1:
        raise UserError(f"--donor-from-id '{regex}' has no group, so it cannot say which part "
                        "of the cell id is the donor. Put the donor in parentheses, e.g. "
                        f"--donor-from-id '^([^_]+)_' for ids like MGH36_A01.")
    return pattern


@dataclass(frozen=True)
class ContextSettings:
    """Options of one build-context run (the CLI's flags; saved as build-context.yaml)."""

    top_genes: Count = 50
    cell_type_col: str = "cell_type"
    cell_type_id_col: str | None = None  # None: `cell_type_ontology_term_id` when present
    donor_col: str | None = None      # None: `donor_id` when present, else one group per file
    donor_from_id: str | None = None  # a regex on the cell ids: its first group is the donor
    batch_col: str | None = None      # CELLxGENE has no batch column, so none by default
    gene_col: str | None = None       # None: `feature_name` when present, else var_names
    max_cells: Count | None = None    # per input file, seeded
    seed: Seed = 0
    context_config: Path | None = None
    rename: list[str] = field(default_factory=list)   # cell types, "OLD=NEW" (NEW empty: drop)
    label_map: Path | None = None     # TSV of cell-type renames, one "OLD<TAB>NEW" per line
    workers: Count | None = field(default=None, metadata=MACHINE)  # None: one per core, up to 8
    chunk_cells: Count | None = field(default=None, metadata=MACHINE)  # None: sized by non-zeros

    def validate(self) -> None:
        if self.donor_from_id is not None:
            donor_pattern(self.donor_from_id)
            if self.donor_col is not None:
                raise UserError(f"--donor-col '{self.donor_col}' and --donor-from-id "
                                f"'{self.donor_from_id}' both say where the donor is; give one.")
        bad = [r for r in self.rename if "=" not in r]
        if bad:
            raise UserError(f"--rename '{bad[0]}' has no '='. Write --rename 'OLD=NEW' (an empty "
                            "NEW drops those cells; use --label-map for labels holding '=').")
