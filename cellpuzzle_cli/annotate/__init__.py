"""annotate: label a new, unlabelled `.h5ad` with a reference's or a trained model's cell types.

The service is `run_annotate` (service.py). One concept per module: `settings` (the run's
options), `query` (reading the query as a lab holds it), `reference` (labelled `.h5ad` files
or a build-context folder), `ranks` (ranked gene lists on the shared genes), `cluster`
(the user's clusters or scanpy's pipeline, subsample + join for large files), one module per
backend (`baseline_backend`, `celltypist_backend`, with `safe_model` for user model files)
filling the same per-cell `evidence`, `decide` (labels and confidence, per cell or per
cluster, one-to-one), `output` (the annotated copy and clusters.tsv), `embed` and `plot`
(annotate.png), `model_backend` + `puzzle_votes` (a trained model answering many puzzles),
`evaluate` (--truth-col), `step` (the pipeline step). Names are re-exported lazily so the CLI
can import the settings cheaply.
"""

from __future__ import annotations

import importlib
from typing import Any

from cellpuzzle_cli.annotate.settings import AnnotateSettings

_EXPORTS = {"service": ("AnnotateResult", "FileResult", "run_annotate")}
_OWNER = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["AnnotateResult", "AnnotateSettings", "FileResult", "run_annotate"]


def __getattr__(name: str) -> Any:
    if name not in _OWNER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_OWNER[name]}"), name)
