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
    """`make demo` loads these with --config: a renamed key must fail here, not 12 minutes in."""
    from pathlib import Path

    from cellpuzzle_cli.build_context import ContextSettings
    from cellpuzzle_cli.config import layer_settings
    from cellpuzzle_cli.init_model import InitModelSettings
    from cellpuzzle_cli.make_qa import MakeQaSettings
    from cellpuzzle_cli.predict.settings import PredictSettings
    from cellpuzzle_cli.rl.settings import load_settings
    from cellpuzzle_cli.sft import SftSettings
    from cellpuzzle_cli.split import SplitSettings
    from cellpuzzle_cli.to_parquet import ToParquetSettings

    recipe = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "tiny-pbmc"
    classes = {"build-context": ContextSettings, "make-qa": MakeQaSettings, "split": SplitSettings,
               "init-model": InitModelSettings, "sft": SftSettings, "predict": PredictSettings,
               "to-parquet": ToParquetSettings}
    assert {p.stem for p in recipe.glob("*.yaml")} == {*classes, "rl-grpo"}
    for step, cls in classes.items():
        layer_settings(cls, recipe / f"{step}.yaml")
    assert (recipe / layer_settings(SplitSettings, recipe / "split.yaml").system_prompt_file.name).is_file()
    rl = load_settings("grpo", recipe / "rl-grpo.yaml", {})
    assert rl.ours.backend == "trl"
