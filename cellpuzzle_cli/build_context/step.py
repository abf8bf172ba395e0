"""build-context as a pipeline step: what the runner records, and the call into `build`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellpuzzle_cli.io import Progress
from cellpuzzle_cli.manifest import Artifact

if TYPE_CHECKING:
    from cellpuzzle_cli.build_context.build import BuildResult
    from cellpuzzle_cli.runner import Job


def plan(job: Job) -> None:
    """The run reads every .h5ad file found under the given files and folders."""
    from cellpuzzle_cli.build_context.build import h5ad_inputs

    job.artifacts = [Artifact(path, "h5ad") for path in h5ad_inputs(job.inputs["h5ad"])]
    if job.settings.label_map is not None:
        job.artifacts.append(Artifact(job.settings.label_map, "label-map"))


def step(job: Job, progress: Progress) -> BuildResult:
    from cellpuzzle_cli.build_context.build import build_context

    return build_context(job.inputs["h5ad"], job.output, job.settings,
                         overwrite=job.overwrite, progress=progress)
