"""pytest set-up: an offline environment for every test, and the `cli` fixture.

The helpers tests import (run_cli, assert_user_error, records, tiny models) are in fixtures.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures import CliResult, run_cli

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def cli(tmp_path: Path):
    """`cli(*args)` runs cellpuzzle with a manifest inside the test's tmp_path."""
    manifest = tmp_path / "cellpuzzle.json"

    def _run(*args: str | Path) -> CliResult:
        return run_cli(*args, manifest=manifest)

    _run.manifest = manifest  # type: ignore[attr-defined]
    return _run
