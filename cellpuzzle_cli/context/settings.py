"""The options of one build-context run, kept apart so every context module can read them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cellpuzzle_cli.errors import UserError


@dataclass(frozen=True)
class ContextConfig:
    """Options of one build-context run (the CLI's flags)."""

    top_genes: int = 50
    cell_type_col: str = "cell_type"
    cell_type_id_col: str | None = None  # None: `cell_type_ontology_term_id` when present
    donor_col: str | None = None      # None: `donor_id` when present, else one group per file
    batch_col: str | None = None      # CELLxGENE has no batch column, so none by default
    gene_col: str | None = None       # None: `feature_name` when present, else var_names
    max_cells: int | None = None      # per input file, seeded
    seed: int = 0
    workers: int = 1
    context_config: Path | None = None
    chunk_cells: int | None = None    # cells per task; None sizes tasks by non-zeros

    def check(self) -> None:
        if self.top_genes < 1:
            raise UserError(f"--top-genes must be at least 1 (got {self.top_genes}).")
        if self.max_cells is not None and self.max_cells < 1:
            raise UserError(f"--max-cells must be at least 1 (got {self.max_cells}); leave it "
                            "out to keep every cell.")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers}).")
