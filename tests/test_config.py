"""Config files plus key=value overrides: typed, and strict about unknown keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cellpuzzle_cli.config import layer_settings, parse_overrides
from cellpuzzle_cli.errors import UserError


@dataclass
class Example:
    learning_rate: float = 1e-4
    max_steps: int = -1
    bf16: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["q_proj"])
    resume: str | None = None


def test_overrides_are_typed_like_yaml():
    assert parse_overrides(["learning_rate=5e-3", "bf16=true", "target_modules=[a, b]"]) == {
        "learning_rate": 5e-3, "bf16": True, "target_modules": ["a", "b"]}


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 0.01\nmax_steps: 5\n")
    cfg = layer_settings(Example, f, {"max_steps": 7})
    assert (cfg.learning_rate, cfg.max_steps, cfg.resume) == (0.01, 7, None)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(UserError) as exc:
        layer_settings(Example, None, {"learning_rat": 1})
    assert "learning_rat" in str(exc.value) and "Did you mean 'learning_rate'" in str(exc.value)


def test_wrong_type_is_refused():
    with pytest.raises(UserError, match="max_steps"):
        layer_settings(Example, None, {"max_steps": "ten"})


def test_yaml_must_be_safe(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("learning_rate: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        layer_settings(Example, f)


def test_the_shipped_recipe_files_are_valid_settings_for_their_commands():
    """`make demo` loads these with --config: a renamed key must fail here, not 12 minutes in.
    Each file is named after its command (`rl-grpo.yaml` for `rl grpo`) and layered as that
    command layers it."""
    from pathlib import Path

    from cellpuzzle_cli.config import layer_settings
    from cellpuzzle_cli.steps import STEPS

    recipe = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "tiny-pbmc"
    commands = {name.replace(" ", "-"): spec for name, spec in STEPS.items()}
    loaded = {}
    for file in sorted(recipe.glob("*.yaml")):
        spec = commands[file.stem]
        loaded[file.stem] = layer_settings(spec.settings_class(), file, load=spec.function("load"))
    assert {"build-context", "make-qa", "split", "init-model", "sft", "predict", "to-parquet",
            "rl-grpo", "annotate"} <= set(loaded)
    assert (recipe / loaded["split"].system_prompt_file.name).is_file()
    assert loaded["rl-grpo"].ours.backend == "trl"
    assert loaded["annotate"].truth_col == "truth"
