"""pytest set-up: an offline environment for every test, the `cli` and `one_thread` fixtures.

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train ~10x faster on one thread when the machine's cores are shared (threads
    otherwise spin against each other). Modules that train use it for all their tests:
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(tmp_path: Path):
    """`cli(*args)` runs cellpuzzle with a manifest inside the test's tmp_path."""
    manifest = tmp_path / "cellpuzzle.json"

    def _run(*args: str | Path) -> CliResult:
        return run_cli(*args, manifest=manifest)

    _run.manifest = manifest  # type: ignore[attr-defined]
    return _run
