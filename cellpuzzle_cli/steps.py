"""The step table: one spec per command, and nothing else to touch when a step is added.

A spec names the command, its settings class (the keys `--config` files and `key=value`
overrides may set), the shipped YAML it starts from, what it reads and writes by kind, and the
service that does the work. `runner.run` reads the spec; the command module only parses options.
Services are named as `module:function` and imported when the step runs, so `cellpuzzle --help`
imports none of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellpuzzle_cli.manifest import Artifact, Kind, Manifest, Resolved


@dataclass(frozen=True)
class In:
    """An input role. `kind`: what the ledger supplies when the user gives nothing (`auto`);
    `param`: its key among the run's recorded params (default: the role's name)."""

    name: str
    kind: Kind | None = None
    what: str = ""
    auto: bool = True
    param: str | None = None

    @property
    def key(self) -> str:
        return self.param or self.name

    @property
    def label(self) -> str:
        return self.what or self.name


@dataclass(frozen=True)
class Out:
    """An output role: the output folder itself (`file` None) or a file inside it; `flag`: a
    file named by an option instead (score's --json), which the runner checks like -o."""

    name: str
    kind: Kind
    file: str | None = None
    flag: str | None = None

    def path(self, output: Path) -> Path:
        return Path(output) / self.file if self.file else Path(output)


@dataclass(frozen=True)
class StepSpec:
    """One command: what it is set with, reads and writes, and the module that does the work.

    The module (under `cellpuzzle_cli`) defines `step(job, progress) -> result`, the service;
    with `plan=True` also `plan(job)`, which resolves what the generic input rules cannot (e.g.
    which base model an adapter needs) before the up-to-date check; with `launch=True` also
    `launch(job) -> exit code | None`, which may run the step elsewhere (torchrun). `settings`
    is a class name in that module (or `module:Class`); `load` (`module:function`) builds the
    settings from layers when they are not plain dataclass fields (rl's verl keys).
    `stamped`: the step publishes one output folder atomically and is skipped when up to date.
    """

    name: str
    module: str
    settings: str
    inputs: tuple[In, ...] = ()
    outputs: tuple[Out, ...] = ()
    shipped: str | None = None
    plan: bool = False
    launch: bool = False
    load: str | None = None
    stamped: bool = True
    label: str = ""
    unit: str = ""

    def _module(self) -> Any:
        return importlib.import_module(f"cellpuzzle_cli.{self.module}")

    def settings_class(self) -> type:
        module, _, name = self.settings.rpartition(":")
        owner = importlib.import_module(f"cellpuzzle_cli.{module}") if module else self._module()
        return getattr(owner, name)

    def function(self, name: str) -> Callable[..., Any] | None:
        """The module's `step`, or its `plan`/`launch`/`load` when the spec declares one."""
        if name == "load":
            if not self.load:
                return None
            module, _, attr = self.load.partition(":")
            return getattr(importlib.import_module(f"cellpuzzle_cli.{module}"), attr)
        if name != "step" and not getattr(self, name):
            return None
        return getattr(self._module(), name)

    def output_kinds(self) -> dict[str, Kind]:
        return {o.name: o.kind for o in self.outputs}

    def artifact(self, name: str, path: Path) -> Artifact:
        """An output of this step as the ledger records it (tests write entries with this)."""
        return Artifact(Path(path), name, self.output_kinds()[name])


_TRAIN = In("train", Kind.TRAIN_PUZZLES, "training data (--data)", param="data")
_MODEL = In("model", Kind.MODEL, "model (--model)", auto=False)

STEPS: dict[str, StepSpec] = {spec.name: spec for spec in (
    StepSpec("build-context", "build_context.step", "build_context.settings:ContextSettings",
             inputs=(In("h5ad", what=".h5ad files", auto=False, param="inputs"),),
             outputs=(Out("cells", Kind.CELLS),), plan=True, label="build-context",
             unit="cells"),
    StepSpec("make-qa", "make_qa", "MakeQaSettings",
             inputs=(In("cells", Kind.CELLS, "cells folder"),),
             outputs=(Out("puzzles", Kind.PUZZLES),), label="Sampling puzzles", unit="groups"),
    StepSpec("split", "split", "SplitSettings",
             inputs=(In("puzzles", Kind.PUZZLES, "puzzles"),),
             outputs=(Out("train", Kind.TRAIN_PUZZLES, "train.jsonl"),
                      Out("test", Kind.TEST_PUZZLES, "test.jsonl")),
             label="Splitting puzzles"),
    StepSpec("init-model", "init_model", "InitModelSettings", inputs=(_TRAIN,),
             outputs=(Out("model", Kind.MODEL),), label="init-model"),
    StepSpec("sft", "sft", "SftSettings", shipped="sft.yaml",
             inputs=(In("base_model", Kind.MODEL, "base model (--model)", param="model"),
                     _TRAIN),
             outputs=(Out("adapter", Kind.ADAPTER),), plan=True, launch=True, label="sft",
             unit="steps"),
    StepSpec("merge-lora", "merge_lora", "MergeLoraSettings",
             inputs=(In("adapter", Kind.ADAPTER, "adapter"),),
             outputs=(Out("model", Kind.MODEL),), plan=True, label="merge-lora"),
    StepSpec("to-parquet", "to_parquet", "ToParquetSettings",
             inputs=(In("train", Kind.TRAIN_PUZZLES, "training data", param="data"),),
             outputs=(Out("train", Kind.RL_TRAIN, "train.parquet"),
                      Out("val", Kind.RL_VAL, "val.parquet")), label="to-parquet"),
    *(StepSpec(f"rl {algo}", "rl.run", "rl.settings:RLSettings", shipped=f"{algo}.yaml",
               load=f"rl.settings:load_{algo}",
               inputs=(In("train", Kind.RL_TRAIN, "training Parquet", auto=False),
                       In("val", Kind.RL_VAL, "validation Parquet", auto=False), _MODEL),
               outputs=(Out("model", Kind.MODEL), Out("checkpoints", Kind.CHECKPOINTS)),
               stamped=False, label=f"rl {algo}")
      for algo in ("grpo", "ppo")),
    StepSpec("convert-ckpt", "convert_ckpt", "ConvertCkptSettings",
             inputs=(In("checkpoint", Kind.CHECKPOINTS, "checkpoint"),),
             outputs=(Out("model", Kind.MODEL),), plan=True, label="convert-ckpt"),
    StepSpec("predict", "predict.run", "predict.settings:PredictSettings",
             shipped="predict.yaml",
             inputs=(In("test", Kind.TEST_PUZZLES, "test data"), _MODEL,
                     In("train", Kind.TRAIN_PUZZLES, "training puzzles", auto=False)),
             outputs=(Out("predictions", Kind.PREDICTIONS),), stamped=False,
             label="predict", unit="puzzles"),
    StepSpec("annotate", "annotate.step", "annotate.settings:AnnotateSettings",
             inputs=(In("query", what="query .h5ad", auto=False),
                     In("reference", what="reference", auto=False), _MODEL),
             outputs=(Out("annotations", Kind.ANNOTATIONS),), plan=True, label="annotate",
             unit="cells"),
    StepSpec("score", "score.run", "score.settings:ScoreSettings",
             inputs=(In("predictions", Kind.PREDICTIONS, "predictions", auto=False),
                     In("reference", what="reference", auto=False),
                     In("label ids", what="label ids", auto=False)),
             outputs=(Out("report", Kind.REPORT, flag="json"), Out("plot", Kind.PLOT, flag="plot"),
                      Out("html", Kind.REPORT, flag="html")), stamped=False,
             label="score"),
)}


def spec(command: str) -> StepSpec:
    return STEPS[command]


def kind_of(command: str, output: str) -> Kind | None:
    """The kind of a recorded output (for ledger entries written before kinds were stored)."""
    found = STEPS.get(command)
    return found.output_kinds().get(output) if found else None


def producers(kind: Kind) -> list[str]:
    """The commands that write artifacts of `kind` (for messages)."""
    return [s.name for s in STEPS.values() if kind in s.output_kinds().values()]


def from_ledger(ledger: Manifest, given: Path | None, kind: Kind, what: str) -> Resolved:
    """`given`, else the newest recorded artifact of `kind` (a clear error names its makers)."""
    return ledger.input_or_latest(given, kind, what, made_by=producers(kind))
