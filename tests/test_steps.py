"""The step table drives every command: one way to set things, one machine-readable outcome.

Walks `steps.STEPS`: every command reads `--config` files and `key=value` overrides against its
own settings class and prints `--format json` on stdout; the cheap steps run end to end with
JSON outcomes, and `key=value` gives the same bytes as the matching option.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest
from fixtures import message_text

from cellpuzzle_cli.config import fields_of, layer_settings, settings_dict
from cellpuzzle_cli.steps import STEPS
from cellpuzzle_cli.synthetic import SyntheticSpec, write_synthetic_h5ad

# what each command needs on its command line to get as far as reading its settings
_REQUIRED = {"build-context": ["missing.h5ad"], "init-model": ["--tiny"], "annotate": ["missing.h5ad"]}


def _command(name: str, out: Path) -> list[str]:
    output = [] if name == "score" else ["-o", str(out)]
    return [*name.split(), *_REQUIRED.get(name, []), *output]


def _valid_keys(name: str) -> list[str]:
    spec = STEPS[name]
    if spec.load:  # rl: our own section's keys (verl's schema judges verl's keys)
        from cellpuzzle_cli.rl.settings import Ours

        return [f"cellpuzzle.{key}" for key in fields_of(Ours)]
    return list(fields_of(spec.settings_class()))


def _misspelt(name: str) -> str:
    return "cellpuzzle.no_such_key" if STEPS[name].load else "no_such_key"


def _json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON object on stdout, got: {stdout!r}"
    return orjson.loads(lines[0])


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_step_reads_its_settings_from_config_and_overrides(cli, tmp_path, name):
    """A misspelt key is refused, naming the step's own valid keys: in a --config file, and as a
    key=value override, and with --format json the refusal is a JSON object on stdout too."""
    key = _misspelt(name)
    section, leaf = key.rpartition(".")[::2]
    config = tmp_path / "bad.yaml"
    config.write_text(f"{section}:\n  {leaf}: 1\n" if section else f"{leaf}: 1\n")
    for extra in (["--config", config], [f"{key}=1"]):
        result = cli(*_command(name, tmp_path / "out"), *extra, "--format", "json")
        assert result.code == 2, result.output
        text = message_text(result)
        assert f"Unknown config key '{key}'" in text
        assert all(valid in text for valid in _valid_keys(name)), text
        outcome = _json_line(result.stdout)
        assert outcome["state"] == "error" and key in outcome["error"]


@pytest.mark.parametrize("name", ["sft", "predict"])
def test_shipped_yaml_holds_exactly_the_dataclass_defaults(name):
    spec = STEPS[name]
    cls = spec.settings_class()
    shipped = layer_settings(cls, shipped=spec.shipped)
    assert settings_dict(shipped) == settings_dict(cls())
    from cellpuzzle_cli.config import load_yaml, shipped_config

    assert set(load_yaml(shipped_config(spec.shipped))) == {f.name for f in dataclasses.fields(cls)}


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("atlas")
    return write_synthetic_h5ad(root / "atlas.h5ad", SyntheticSpec(n_cells=400, n_donors=3,
                                                                   n_cell_types=5))


def test_cheap_steps_end_to_end_as_json(cli, tmp_path, atlas):
    """build-context → make-qa → split → to-parquet → predict (baseline) → score → manifest,
    each printing one JSON outcome whose outputs exist."""
    runs = [("build-context", atlas, "-o", tmp_path / "cells", "top_genes=20"),
            ("make-qa", "-o", tmp_path / "puzzles", "--max-n", "4", "seed=3"),
            ("split", "-o", tmp_path / "splits", "seed=3"),
            ("to-parquet", "-o", tmp_path / "rl"),
            ("predict", "--backend", "baseline", "-o", tmp_path / "preds"),
            ("score", tmp_path / "preds", "bootstrap=0", "--json", tmp_path / "score.json")]
    for args in runs:
        result = cli(*args, "--format", "json")
        assert result.code == 0, result.output
        outcome = _json_line(result.stdout)
        assert outcome["command"] == args[0] and outcome["state"] == "done"
        assert outcome["outputs"] and all(Path(p).exists() for p in outcome["outputs"].values())
        assert outcome["timings"]["seconds"] >= 0
    assert orjson.loads((tmp_path / "score.json").read_bytes())["count"] > 0
    again = _json_line(cli(*runs[1], "--format", "json").stdout)
    assert again["state"] == "up to date"
    listed = _json_line(cli("manifest", "--format", "json").stdout)
    assert [e["command"] for e in listed["entries"]] == [r[0] for r in runs]


@pytest.mark.parametrize("first, second", [
    (("make-qa", "seed=3"), ("make-qa", "--seed", "3")),
    (("split", "seed=3"), ("split", "--seed", "3")),
    (("build-context", "top_genes=20"), ("build-context", "--top-genes", "20")),
])
def test_key_value_matches_the_option(cli, tmp_path, atlas, first, second):
    """`key=value` and the matching option make the same bytes (and differ from the default)."""
    cli("build-context", atlas, "-o", tmp_path / "cells")
    cli("make-qa", "-o", tmp_path / "puzzles", "--max-n", "4")
    before = {"build-context": [atlas], "make-qa": [tmp_path / "cells"],
              "split": [tmp_path / "puzzles"]}[first[0]]
    made = []
    for i, args in enumerate((first, second, (first[0],))):
        out = tmp_path / f"{first[0]}-{i}"
        result = cli(args[0], *before, "-o", out, *args[1:])
        assert result.code == 0, result.output
        made.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*"))
                     if p.is_file() and not p.name.startswith(".")})
    assert made[0] == made[1]
    assert made[0] != made[2]
