"""Cell-o1 metrics over prediction files: reading runs, judging predictions, summarising.

Per prediction (via `answer.judge`): an illegitimate layout scores 0 correct of its N, not
exact, uniqueness 0. Summaries: `cell_accuracy` = Σcorrect/ΣN, `exact_match`,
`format_legitimacy`, `uniqueness` (means over predictions) and `prediction_length`, overall
and per N, each with
- `<metric>_pm`: the "±" Cell-o1's evaluation script prints (sample std of per-prediction
  values for cell accuracy and uniqueness, sqrt(p(1-p)/n) for exact match and format),
- `<metric>_se`: the standard error of the mean, sample std / sqrt(n),
- `<metric>_ci95`: a percentile bootstrap interval over predictions (seeded).

The bootstrap resamples counts of distinct per-prediction outcomes with one multinomial draw
per resample, which is the ordinary resample-with-replacement bootstrap, computed in
O(resamples × distinct outcomes) instead of O(resamples × predictions).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.answer import (
    Verdict,
    answer_items_lower,
    judge_lowered,
    record_answer,
    reward_from_verdict,
)
from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.io import find_files, iter_jsonl, read_records

METRICS = ("cell_accuracy", "exact_match", "format_legitimacy", "uniqueness")
PM_DEFINITION = {
    "cell_accuracy": "sample std (ddof=1) of per-prediction correct/N, as Cell-o1 prints it",
    "exact_match": "sqrt(p(1-p)/count), as Cell-o1 prints it",
    "format_legitimacy": "sqrt(p(1-p)/count), as Cell-o1 prints it",
    "uniqueness": "sample std (ddof=1) of per-prediction uniqueness, as Cell-o1 prints it",
}
_LENGTH_CHUNK = 2048  # texts held at once while streaming a run


@dataclass
class Judged:
    """Per-prediction results of one run, as parallel arrays."""

    name: str
    files: list[Path]
    puzzle_ids: list[str | None]
    n: np.ndarray
    correct: np.ndarray
    exact: np.ndarray
    legitimate: np.ndarray
    n_items: np.ndarray
    n_distinct: np.ndarray
    length: np.ndarray
    errors: int

    @property
    def uniqueness(self) -> np.ndarray:
        """Distinct items / items per prediction (0 when illegitimate or empty)."""
        items = np.maximum(self.n_items, 1)
        return np.where(self.legitimate & (self.n_items > 0), self.n_distinct / items, 0.0)

    @property
    def reward(self) -> np.ndarray:
        """The `cello1` reward of every prediction, from the same numbers `score` reports."""
        rows = zip(self.legitimate.tolist(), self.n.tolist(), self.correct.tolist(),
                   self.exact.tolist(), self.n_items.tolist(), self.n_distinct.tolist())
        return np.array([reward_from_verdict(Verdict(*row)) for row in rows], dtype=np.float64)


@dataclass
class Report:
    """The scores of one run: `overall` and `by_n` map metric names to numbers."""

    name: str
    overall: dict[str, Any]
    by_n: dict[int, dict[str, Any]]
    files: list[str]
    errors: int
    missing: list[str] | None = None
    length_unit: str = "whitespace words"
    cello1_compat: bool = False
    bootstrap: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.overall)
        out["overall"] = self.overall
        out["by_n"] = {str(k): v for k, v in sorted(self.by_n.items())}
        out["errors"] = self.errors
        out["prediction_length_unit"] = self.length_unit
        out["cello1_compat"] = self.cello1_compat
        out["pm_definition"] = PM_DEFINITION
        out["bootstrap"] = self.bootstrap
        out["inputs"] = self.files
        if self.missing is not None:
            out["missing"] = self.missing
            out["missing_count"] = len(self.missing)
        return out


# -- reading -------------------------------------------------------------------------------
def _file_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a prediction file, streamed for JSONL so big runs need little memory."""
    if path.suffix.lower() == ".jsonl":
        return iter_jsonl(path)
    return iter(read_records(path))


@dataclass
class RunInput:
    """One run's prediction files; `strict` refuses files without predictions (named by the user)."""

    name: str
    files: list[Path]
    strict: bool = False


def collect_files(inputs: Sequence[Path]) -> list[RunInput]:
    """Group inputs into runs: each folder is one run; files given directly form one run together."""
    runs: list[RunInput] = []
    loose: list[Path] = []
    for raw in inputs:
        p = existing_path(raw, "prediction input")
        if p.is_dir():
            files = [f for f, _ in find_files([p], (".jsonl", ".json"), "prediction folder")]
            if not files:
                raise UserError(f"The folder {p} holds no .jsonl or .json prediction files. Point "
                                "`score` at the output folder of `cellpuzzle predict`.")
            runs.append(RunInput(p.resolve().name or str(p), files))
        else:
            loose.append(p.resolve())
    if loose:
        name = loose[0].stem if len(loose) == 1 else loose[0].parent.name
        runs.insert(0, RunInput(name, loose, strict=True))
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"
    return runs


def load_reference(path: Path) -> dict[str, dict[str, Any]]:
    records = read_records(path)
    ref = {}
    for r in records:
        pid = r.get("puzzle_id")
        if pid is not None:
            ref[str(pid)] = r
    if not ref:
        raise UserError(f"The reference {path} holds no records with a `puzzle_id`. Pass the test "
                        "split written by `cellpuzzle split`.")
    return ref


def judge_run(name: str, files: Sequence[Path], cello1_compat: bool = False,
              lengths: Callable[[list[str]], np.ndarray] | None = None,
              reference: dict[str, dict[str, Any]] | None = None,
              strict_files: bool = False) -> Judged:
    """Read and judge every prediction of one run.

    In folders, files whose records carry no `prediction` (configs, splits) are skipped;
    `strict_files` refuses them instead (files the user named).
    """
    owner: dict[str, Path] = {}
    ids: list[str | None] = []
    rows: list[tuple[bool, int, bool, int, int, int]] = []
    length_parts: list[np.ndarray] = []
    texts: list[str] = []
    used: list[Path] = []
    errors = 0
    count_lengths = lengths or whitespace_words
    for path in files:
        records = _file_records(path)
        first = next(records, None)
        if not isinstance(first, dict) or "prediction" not in first:
            if strict_files:
                raise UserError(f"{path} holds no predictions (records need a `prediction` field). "
                                "Give the files written by `cellpuzzle predict`.")
            continue
        used.append(path)
        for i, rec in enumerate(itertools.chain((first,), records)):
            if not isinstance(rec, dict):
                raise UserError(f"Record {i + 1} of {path} is not a JSON object. Give the files "
                                "written by `cellpuzzle predict`.")
            pid = rec.get("puzzle_id")
            if pid is not None:
                pid = str(pid)
                other = owner.get(pid)
                if other is not None:
                    where = f"both {other} and {path}" if other != path else f"{path} twice"
                    raise UserError(f"Puzzle '{pid}' has a prediction in {where}. Score each run "
                                    "separately (one folder per run, e.g. `cellpuzzle score runA/ "
                                    "runB/`) or remove the duplicate shard.")
                owner[pid] = path
            gold_raw = record_answer(rec)
            if gold_raw is None and reference is not None and pid in reference:
                gold_raw = record_answer(reference[pid])
            gold = answer_items_lower(gold_raw)
            if not gold:
                raise UserError(f"Record {i + 1} of {path} has no gold answer (`answer` or "
                                "`assistant_msg`). Pass --reference with the test split to take "
                                "answers from it.")
            text = rec.get("prediction")
            if text is None or rec.get("error") is not None:
                errors += 1
                text = ""
                rows.append((False, 0, False, 0, 0, len(gold)))
            else:
                if not isinstance(text, str):
                    text = str(text)
                rows.append((*judge_lowered(text, gold, cello1_compat), len(gold)))
            texts.append(text)
            ids.append(pid)
            if len(texts) >= _LENGTH_CHUNK:
                length_parts.append(np.asarray(count_lengths(texts), dtype=np.float64))
                texts = []
    if texts:
        length_parts.append(np.asarray(count_lengths(texts), dtype=np.float64))
    if not rows:
        raise UserError(f"No predictions found for run '{name}' in {', '.join(map(str, files))}. "
                        "Give prediction JSONL files (field `prediction`) or folders of them.")
    arr = np.array(rows, dtype=np.int64).reshape(len(rows), 6)
    return Judged(name, used, ids, arr[:, 5], arr[:, 1], arr[:, 2].astype(bool), arr[:, 0].astype(bool),
                  arr[:, 3], arr[:, 4], np.concatenate(length_parts), errors)


# Byte table: 1 for the ASCII characters `str.split()` treats as whitespace
# (\t \n \v \f \r, \x1c-\x1f and space), 0 otherwise.
_SPACE_TABLE = bytes(1 if b in (9, 10, 11, 12, 13, 28, 29, 30, 31, 32) else 0 for b in range(256))


def whitespace_words(texts: Sequence[str], chunk: int = 2048) -> np.ndarray:
    """`len(t.split())` for every text; ASCII texts are counted in bulk with numpy.

    A word starts at a non-space byte preceded by a space (or the start); texts are joined with
    a space after each, so every text's segment is non-empty and words never straddle texts.
    """
    out = np.zeros(len(texts), dtype=np.int64)
    for s in range(0, len(texts), chunk):
        block = texts[s:s + chunk]
        ascii_idx = []
        for i, t in enumerate(block):
            if t.isascii():
                ascii_idx.append(i)
            else:
                out[s + i] = len(t.split())
        if not ascii_idx:
            continue
        parts = [block[i] for i in ascii_idx]
        joined = (" ".join(parts) + " ").encode("ascii")
        space = np.frombuffer(joined.translate(_SPACE_TABLE), dtype=np.bool_)
        starts = ~space
        starts[1:] &= space[:-1]
        lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        begin = np.concatenate(([0], np.cumsum(lens + 1)[:-1]))
        counts = np.add.reduceat(starts.view(np.uint8), begin, dtype=np.int32)
        out[s + np.asarray(ascii_idx)] = counts
    return out


def tokenizer_lengths(tokenizer_dir: Path) -> Callable[[list[str]], np.ndarray]:
    """Token counts with a local tokenizer (no remote code, no download)."""
    from transformers import AutoTokenizer

    path = existing_path(tokenizer_dir, "tokenizer folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a bad folder
        raise UserError(f"Could not load a tokenizer from {path} ({exc}). Give a model or tokenizer "
                        "folder holding tokenizer.json or tokenizer_config.json.") from exc

    def count(texts: list[str]) -> np.ndarray:
        out = np.zeros(len(texts), dtype=np.int64)
        step = 4096
        for s in range(0, len(texts), step):
            enc = tok(texts[s:s + step], add_special_tokens=False)["input_ids"]
            out[s:s + len(enc)] = [len(e) for e in enc]
        return out

    return count


# -- summarising ---------------------------------------------------------------------------
def _sample_std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def summarise(j: Judged, mask: np.ndarray | None, rng: np.random.Generator,
              resamples: int) -> dict[str, Any]:
    """Metrics, Cell-o1's ±, standard errors and bootstrap intervals for the selected predictions."""
    sel = slice(None) if mask is None else mask
    n, correct = j.n[sel], j.correct[sel]
    exact, legit = j.exact[sel].astype(np.float64), j.legitimate[sel].astype(np.float64)
    uniq, length = j.uniqueness[sel], j.length[sel]
    count = len(n)
    partial = correct / np.maximum(n, 1)
    values = {
        "cell_accuracy": float(correct.sum() / max(int(n.sum()), 1)),
        "exact_match": float(exact.mean()),
        "format_legitimacy": float(legit.mean()),
        "uniqueness": float(uniq.mean()),
    }
    per_prediction = {"cell_accuracy": partial, "exact_match": exact,
                      "format_legitimacy": legit, "uniqueness": uniq}
    out: dict[str, Any] = {"count": count, "cells": int(n.sum())}
    for m in METRICS:
        v = values[m]
        out[m] = v
        if m in ("exact_match", "format_legitimacy"):
            out[f"{m}_pm"] = math.sqrt(v * (1 - v) / count) if count else 0.0
        else:
            out[f"{m}_pm"] = _sample_std(per_prediction[m])
        out[f"{m}_se"] = _sample_std(per_prediction[m]) / math.sqrt(count) if count else 0.0
    out["prediction_length"] = float(length.mean())
    out["prediction_length_se"] = _sample_std(length) / math.sqrt(count) if count else 0.0
    out.update(_bootstrap(n, correct, exact, legit, uniq, rng, resamples))
    return out


def _bootstrap(n: np.ndarray, correct: np.ndarray, exact: np.ndarray, legit: np.ndarray,
               uniq: np.ndarray, rng: np.random.Generator, resamples: int) -> dict[str, list[float]]:
    if resamples <= 0 or len(n) == 0:
        return {}
    # One integer per distinct outcome; the first prediction with that outcome supplies its values.
    _, first, counts = np.unique(_outcome_key(n, correct, exact, legit, uniq), return_index=True,
                                 return_counts=True)
    weights = rng.multinomial(len(n), counts / counts.sum(), size=resamples).astype(np.float64)
    kn, kc = n[first].astype(np.float64), correct[first].astype(np.float64)
    draws = {
        "cell_accuracy": (weights @ kc) / np.maximum(weights @ kn, 1),
        "exact_match": (weights @ exact[first]) / len(n),
        "format_legitimacy": (weights @ legit[first]) / len(n),
        "uniqueness": (weights @ uniq[first]) / len(n),
    }
    return {f"{m}_ci95": [float(x) for x in np.percentile(d, [2.5, 97.5])] for m, d in draws.items()}


def _outcome_key(n: np.ndarray, correct: np.ndarray, exact: np.ndarray, legit: np.ndarray,
                 uniq: np.ndarray) -> np.ndarray:
    """Distinct (n, correct, exact, legit, uniqueness) tuples map to distinct integers."""
    _, uniq_code = np.unique(uniq, return_inverse=True)
    key = n.astype(np.int64)
    for part, size in ((correct, int(correct.max(initial=0)) + 1), (exact, 2), (legit, 2),
                       (uniq_code, int(uniq_code.max(initial=0)) + 1)):
        key = key * size + part.astype(np.int64)
    return key


def report(j: Judged, resamples: int = 1000, seed: int = 0, cello1_compat: bool = False,
           length_unit: str = "whitespace words",
           reference: dict[str, dict[str, Any]] | None = None) -> Report:
    rng = np.random.default_rng(seed)
    overall = summarise(j, None, rng, resamples)
    overall["errors"] = j.errors
    by_n = {}
    for value in np.unique(j.n):
        by_n[int(value)] = summarise(j, j.n == value, np.random.default_rng([seed, int(value)]), resamples)
    missing = None
    if reference is not None:
        have = {p for p in j.puzzle_ids if p is not None}
        missing = sorted(pid for pid in reference if pid not in have)
    return Report(j.name, overall, by_n, [str(f) for f in j.files], j.errors, missing, length_unit,
                  cello1_compat, {"resamples": resamples, "seed": seed})


@dataclass
class ScoreResult:
    reports: list[Report]
    length_unit: str

    def to_json(self) -> dict[str, Any]:
        if len(self.reports) == 1:
            return self.reports[0].to_json()
        return {r.name: r.to_json() for r in self.reports}


def score_runs(runs: Sequence[RunInput], cello1_compat: bool = False,
               tokenizer: Path | None = None, reference: Path | None = None,
               resamples: int = 1000, seed: int = 0) -> ScoreResult:
    """Judge and summarise each run."""
    lengths = tokenizer_lengths(tokenizer) if tokenizer is not None else None
    unit = f"tokens ({Path(tokenizer).name} tokenizer)" if tokenizer is not None else "whitespace words"
    ref = load_reference(existing_path(reference, "reference file")) if reference is not None else None
    reports = []
    for run in runs:
        j = judge_run(run.name, run.files, cello1_compat, lengths, ref, run.strict)
        if ref is not None and not any(pid in ref for pid in j.puzzle_ids):
            raise UserError(f"None of the {len(j.puzzle_ids)} predictions of run '{run.name}' "
                            f"has a puzzle id from the reference {reference}, so they answer "
                            "other puzzles. Pass the test split these predictions were made on.")
        reports.append(report(j, resamples, seed, cello1_compat, unit, ref))
    return ScoreResult(reports, unit)


# -- the command -------------------------------------------------------------------------
@dataclass
class ScoreRequest:
    """What `cellpuzzle score` was asked; no `predictions` means the latest predict run."""

    predictions: list[Path] = field(default_factory=list)
    json_out: Path | None = None
    plot: Path | None = None
    reference: Path | None = None
    tokenizer: Path | None = None
    cello1_compat: bool = False
    partial: bool = False
    bootstrap: int = 1000
    seed: int = 0


@dataclass
class ScoreOutcome:
    result: ScoreResult
    notes: list[str]
    warnings: list[str]
    record: Any  # manifest.RunRecord


def _runs_from_manifest(manifest: Any, partial: bool) -> tuple[list[RunInput], list[str], list[str]]:
    """Every shard of the latest predict run; an incomplete set only with `partial`."""
    shards = manifest.predict_shards()
    warnings = []
    if shards.missing:
        listed = ", ".join(str(i) for i in shards.missing)
        if not partial or not shards.files:
            raise UserError(
                f"The latest `predict` run ({shards.output_dir}, {shards.num_shards} shard(s)) is "
                f"incomplete: shard(s) {listed} of {shards.num_shards} have no finished entry in "
                f"{manifest.path}. Run them (`cellpuzzle predict --shard i/{shards.num_shards} …`), "
                "or pass --partial to score the finished shards only.")
        warnings.append(f"Scoring {len(shards.files)} of {shards.num_shards} shards; missing: "
                        f"{listed}.")
    notes = [f"Using predictions from the manifest: {shards.output_dir}"]
    run = RunInput(Path(shards.output_dir).name or "predictions", shards.files, strict=True)
    return [run], notes, warnings


def score(req: ScoreRequest, manifest: Any) -> ScoreOutcome:
    """Score the given runs (or the latest predict run), write --json/--plot, say what to record."""
    from cellpuzzle_cli.manifest import Artifact, RunRecord

    if req.predictions:
        runs, notes, warnings = collect_files(req.predictions), [], []
        input_paths = list(req.predictions)
    else:
        runs, notes, warnings = _runs_from_manifest(manifest, req.partial)
        input_paths = runs[0].files
    result = score_runs(runs, cello1_compat=req.cello1_compat, tokenizer=req.tokenizer,
                        reference=req.reference, resamples=req.bootstrap, seed=req.seed)
    outputs = []
    if req.json_out is not None:
        from cellpuzzle_cli.io import write_json

        write_json(req.json_out, result.to_json())
        outputs.append(Artifact(req.json_out, "report"))
    if req.plot is not None:
        plot_by_n(result.reports, req.plot)
        outputs.append(Artifact(req.plot, "plot"))
    params = {"runs": [r.name for r in runs], "cello1_compat": req.cello1_compat,
              "tokenizer": req.tokenizer, "reference": req.reference, "partial": req.partial,
              "bootstrap": req.bootstrap, "seed": req.seed, "json": req.json_out,
              "plot": req.plot, "prediction_length_unit": result.length_unit}
    summary = {r.name: {k: r.overall[k] for k in ("count", "cell_accuracy", "exact_match",
                                                  "format_legitimacy", "uniqueness", "errors")}
               for r in result.reports}
    inputs = [Artifact(p, "predictions") for p in input_paths]
    if req.reference is not None:
        inputs.append(Artifact(req.reference, "reference"))
    return ScoreOutcome(result, notes, warnings,
                        RunRecord(params, inputs, outputs, {"summary": summary}))


# -- plot ----------------------------------------------------------------------------------
def plot_by_n(reports: Sequence[Report], path: Path) -> None:
    """Cell accuracy and exact match by N, one line per run, written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellpuzzle_cli.io import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, title in ((axes[0], "cell_accuracy", "Cell accuracy"),
                              (axes[1], "exact_match", "Exact match")):
        for r in reports:
            ns = sorted(r.by_n)
            vals = [r.by_n[k][metric] for k in ns]
            lo = [r.by_n[k].get(f"{metric}_ci95", [v, v])[0] for k, v in zip(ns, vals)]
            hi = [r.by_n[k].get(f"{metric}_ci95", [v, v])[1] for k, v in zip(ns, vals)]
            line, = ax.plot(ns, vals, marker="o", label=r.name)
            ax.fill_between(ns, lo, hi, alpha=0.15, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("N (cells per puzzle)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (95% bootstrap band)")
    axes[1].legend(loc="best", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
