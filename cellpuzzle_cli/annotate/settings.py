"""The options of one annotate run (the CLI's flags; saved as annotate.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from cellpuzzle_cli.config import Check, Count, Fraction, NonNegative, Rate, Seed, one_of
from cellpuzzle_cli.errors import UserError

BACKENDS = ("baseline", "celltypist", "hf", "vllm")
MODEL_BACKENDS = ("hf", "vllm")
LABEL_BY = ("auto", "cell", "cluster")
MACHINE = {"machine": True}   # how fast, never what: left out of the saved annotate.yaml


@dataclass
class AnnotateSettings:
    """How to annotate a query against a reference.

    `label_by`: `cluster` gives every cell of a cluster the cluster's label; `cell` gives each
    cell the best candidate of its own evidence averaged with its `smooth_neighbors` nearest
    neighbours; `auto` is `cluster` when the user named the clusters (`cluster_col`) or asked
    for `one_to_one`, else `cell` (measured on Kang 2018: clusters of one donor do not follow
    the reference's type boundaries, see docs/benchmarks.md, "annotate").
    """

    backend: Annotated[str, one_of(*BACKENDS)] = "baseline"
    cluster_col: str | None = None        # None: cluster the query here (scanpy, seeded)
    candidates: list[str] | None = None   # None: every type of the reference
    cell_type_col: str = "cell_type"      # the reference's label column (as build-context)
    cell_type_id_col: str | None = None   # None: `cell_type_ontology_term_id` when present
    gene_col: str | None = None           # None: `feature_name` when present, else var_names
    label_by: Annotated[str, one_of(*LABEL_BY)] = "auto"
    min_confidence: Fraction = 0.0        # below it a cell is `unassigned`
    one_to_one: bool = False              # each candidate to at most one cluster (Hungarian)
    seed: Seed = 0
    top_genes: Count = 300                # baseline: ranked genes per cell (capped by a cells/ ref)
    type_prior: Annotated[str, one_of("reference", "uniform")] = "reference"  # baseline
    resolution: Rate | None = None        # None: CellTypist's over-clustering rule by size
    n_neighbors: Annotated[int, Check(2)] = 15
    n_pcs: Count = 50
    hvg_genes: Count = 2000
    smooth_neighbors: NonNegative = 0     # label_by=cell: neighbours averaged in (0: none)
    max_cells_in_memory: Annotated[int, Check(100)] = 100_000
    plot: bool = True
    plot_cells: Annotated[int, Check(100)] = 5_000
    celltypist_model: Path | None = None  # a CellTypist .pkl instead of training on the reference
    truth_col: str | None = None          # query labels to compare with at the end, never used
    # hf/vllm: each cluster in this many puzzles, a cell drawn from up to cells_per_cluster;
    # puzzle size, genes per cell and system message as the model was trained (None: that)
    puzzles_per_cluster: Count = 24
    cells_per_cluster: Count = 50
    puzzle_cells: Count | None = None
    puzzle_candidates: Count | None = None
    context: str | None = None            # the puzzles' context paragraph (None: the model's)
    max_new_tokens: Count = 1024
    batch_size: Count | None = None
    workers: Count | None = field(default=None, metadata=MACHINE)   # None: one per core, up to 8
    chunk_cells: Count | None = field(default=None, metadata=MACHINE)

    def validate(self) -> None:
        if self.backend in MODEL_BACKENDS and self.label_by == "cell":
            raise UserError(f"--backend {self.backend} votes per cluster (each cluster is asked "
                            "in many puzzles), so label_by=cell cannot be used with it. Leave "
                            "label_by at auto (or cluster).")
        if (self.puzzle_cells and self.puzzle_candidates
                and self.puzzle_candidates < self.puzzle_cells):
            raise UserError(f"puzzle_candidates ({self.puzzle_candidates}) is below puzzle_cells "
                            f"({self.puzzle_cells}); a puzzle needs a candidate for every cell.")
        if self.one_to_one and self.label_by == "cell":
            raise UserError("one_to_one assigns candidates to clusters, but label_by=cell labels "
                            "each cell on its own. Use label_by=cluster (or auto) with "
                            "--one-to-one, or leave --one-to-one out.")
        if self.celltypist_model is not None and self.backend != "celltypist":
            raise UserError(f"A CellTypist model file ({self.celltypist_model}) was given, but "
                            f"the backend is '{self.backend}'. Add --backend celltypist, or "
                            "leave the model file out.")
        if self.candidates is not None:
            from cellpuzzle_cli.build_context.label_policy import tidy

            names = [tidy(c) for c in self.candidates]
            if not names or any(not n for n in names):
                raise UserError("The candidate list is empty or holds an empty name. Give cell "
                                "type names separated by commas, or leave --candidates out to "
                                "use every type of the reference.")
            lowered = [n.lower() for n in names]
            twice = [n for n, low in zip(names, lowered) if lowered.count(low) > 1]
            if twice:
                raise UserError(f"The candidate '{twice[0]}' is listed twice (case is ignored). "
                                "List each cell type once.")

    @property
    def by_cluster(self) -> bool:
        """Whether every cell takes its cluster's label (see the class docstring)."""
        if self.label_by == "auto":
            return (self.cluster_col is not None or self.one_to_one
                    or self.backend in MODEL_BACKENDS)
        return self.label_by == "cluster"
