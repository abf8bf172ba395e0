"""Shared test helpers: run the CLI in-process, offline Hugging Face, tiny models."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str | Path, manifest: Path | None = None) -> CliResult:
    """Run `cellpuzzle ARGS…` in this process, as a user would from the shell."""
    from cellpuzzle_cli.cli import main

    argv = [str(a) for a in args]
    if manifest is not None:
        argv = ["--manifest", str(manifest), *argv]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(tmp_path: Path):
    """`cli(*args)` runs cellpuzzle with a manifest inside the test's tmp_path."""
    manifest = tmp_path / "cellpuzzle.json"

    def _run(*args: str | Path) -> CliResult:
        return run_cli(*args, manifest=manifest)

    _run.manifest = manifest  # type: ignore[attr-defined]
    return _run


def message_text(result: CliResult) -> str:
    """The output as one line, without the error panel's borders, so a fragment the panel
    happened to wrap (the wrap moves with the length of tmp paths) is still found."""
    import re

    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def assert_user_error(result: CliResult, *fragments: str) -> None:
    """Exit 2, a message containing every fragment, and no traceback."""
    assert result.code == 2, result.output
    assert "Traceback" not in result.output, result.output
    text = message_text(result).lower()
    for fragment in fragments:
        assert fragment.lower() in text, f"{fragment!r} not in: {result.output}"
