"""The entry point itself: instant help, every command listed, clean errors."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from fixtures import run_cli

COMMANDS = ["build-context", "make-qa", "split", "init-model", "sft", "merge-lora", "to-parquet",
            "rl grpo", "rl ppo", "convert-ckpt", "predict", "score", "annotate", "manifest"]


def test_help_lists_every_command_quickly():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cellpuzzle_cli", "--help"], capture_output=True,
                          text=True, check=True)
    elapsed = time.perf_counter() - t0
    # the rows of the Commands panel, not words the description mentions anyway
    listed = set(re.findall(r"^│ ([a-z][a-z-]*) ", proc.stdout, re.MULTILINE))
    assert listed == {command.split()[0] for command in COMMANDS}
    assert elapsed < 2.0, f"--help took {elapsed:.2f}s; a heavy import crept into start-up"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_registered_with_an_example(command):
    result = run_cli(*command.split(), "--help")
    assert result.code == 0, result.output
    assert f"Usage: cellpuzzle {command}" in " ".join(result.output.split())
    assert "Example" in result.output


def test_help_imports_no_heavy_library():
    code = ("import sys; from cellpuzzle_cli.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch','transformers','scanpy','anndata','pyarrow','trl','verl', "
            "'numpy','pandas') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "HEAVY []" in out


def test_manifest_command_on_empty_ledger(tmp_path):
    result = run_cli("manifest", manifest=tmp_path / "m.json")
    assert result.code == 0
    assert "0 run(s)" in result.output


def test_bad_override_syntax_is_a_user_error():
    from cellpuzzle_cli.config import parse_overrides
    from cellpuzzle_cli.errors import UserError

    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["learning_rate"])
