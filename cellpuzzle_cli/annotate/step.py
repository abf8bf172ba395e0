"""annotate as a pipeline step: what the runner records, and the call into the service.

The query files and the reference are recorded as inputs. A reference that is a build-context
output folder brings the .h5ad files it was built from (CellTypist reads their expression); a
model backend takes the newest model from the ledger when none is given, and the training
puzzles upstream of it tell how to ask it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cellpuzzle_cli.annotate.settings import MODEL_BACKENDS
from cellpuzzle_cli.io import Progress
from cellpuzzle_cli.manifest import Artifact, Kind

if TYPE_CHECKING:
    from cellpuzzle_cli.annotate.service import AnnotateResult
    from cellpuzzle_cli.runner import Job


def plan(job: Job) -> None:
    from cellpuzzle_cli.annotate.service import query_files
    from cellpuzzle_cli.steps import from_ledger

    queries = [path for path, _ in query_files(job.inputs["query"], job.output)]
    job.artifacts = [a for a in job.artifacts if a.name != "query"]
    job.artifacts[:0] = [Artifact(path, "query") for path in queries]
    reference = job.inputs.get("reference")
    made = job.ledger.producer_of(Path(reference)) if reference is not None else None
    job.flags["reference_h5ads"] = [job.ledger.resolve(i.path) for i in made.inputs
                                    if i.name == "h5ad"] if made else []
    if job.settings.backend in MODEL_BACKENDS:
        model = from_ledger(job.ledger, job.inputs.get("model"), Kind.MODEL, "model (--model)")
        job.notes.append(model.note("model") or "")
        job.inputs["model"] = model.path
        job.params["model"] = model.path
        if not any(a.name == "model" for a in job.artifacts):
            job.artifacts.append(Artifact(model.path, "model"))
        job.flags["training"] = job.ledger.upstream(model.path, Kind.TRAIN_PUZZLES)
    job.notes[:] = [n for n in job.notes if n]


def step(job: Job, progress: Progress) -> AnnotateResult:
    from cellpuzzle_cli.annotate.model_backend import trained_model
    from cellpuzzle_cli.annotate.service import run_annotate

    model = None
    if job.settings.backend in MODEL_BACKENDS:
        model = trained_model(job.inputs["model"], job.flags.get("training"))
    return run_annotate(job.inputs["query"], job.inputs.get("reference"), job.output,
                        job.settings, reference_h5ads=job.flags["reference_h5ads"], model=model,
                        trust_remote_code=job.flag("trust_remote_code", False),
                        overwrite=job.overwrite, progress=progress)
