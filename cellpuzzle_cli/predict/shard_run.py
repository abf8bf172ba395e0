"""Predict: model answers for one shard of the test set, written so a killed run resumes.

`run_predict(job)` answers one shard (`run` is the step's service around it). It writes
`<out>/shard-{i}-of-{n}.jsonl`, one line per puzzle (fields: see `_line`), appending and
fsyncing each batch; a re-run skips the puzzles already there. A batch that fails (out of
memory, prompt too long) is split in halves down to single puzzles; a puzzle that still fails
gets `prediction: null` and the error, never the error text as its answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from cellpuzzle_cli.answer import parse_answer, unreadable_warning
from cellpuzzle_cli.config import check_settings
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress, write_json
from cellpuzzle_cli.make_qa import IDS_FIELD
from cellpuzzle_cli.predict.backends import make_backend, model_label, resolve_backend
from cellpuzzle_cli.predict.base import Backend, Generation
from cellpuzzle_cli.predict.records import (
    ShardWriter,
    candidate_count,
    load_test_records,
    puzzle_size,
    read_done,
    rewrite_in_order,
)
from cellpuzzle_cli.predict.settings import TRAINED_BACKENDS, PredictJob
from cellpuzzle_cli.predict.shards import Shard, first_puzzles, parse_shard, select_shard

# What a folder's shard files were made with, checked when a run resumes (its settings are
# also saved, reloadable, as predict.yaml).
RUN_FILE = ".predict-run.json"
# Failures worth retrying with a smaller batch: torch.OutOfMemoryError is a RuntimeError;
# ValueError covers prompts longer than the model allows.
RETRYABLE = (RuntimeError, MemoryError, ValueError)
# Settings that change the answers: a resumed shard must match them.
_ANSWER_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "n", "seed", "dtype")
_MAX_ERROR_CHARS = 500



@dataclass
class PredictResult:
    shard_file: Path
    output_dir: Path
    shard_index: int
    num_shards: int
    backend: str
    model: str
    total: int          # puzzles in this shard
    resumed: int        # already in the file when the run started
    generated: int      # answered in this run
    errors: int         # lines (old and new) with prediction null
    seconds: float      # generation time of this run
    prompt_tokens: int
    completion_tokens: int
    warnings: list[str] = field(default_factory=list)  # e.g. most answers not in the format
    limit: int | None = None   # --limit: only the first N puzzles of the set were asked for
    shard_puzzles: int = 0     # the shard's puzzles without --limit
    answered: int = 0          # lines in the shard file now (with --limit: may exceed `total`)

    @property
    def partial(self) -> bool:
        """The shard file answers only some of the shard's puzzles (`--limit`)."""
        return self.answered < self.shard_puzzles

    @property
    def prompts_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


def _run_identity(settings: PredictJob, backend: str) -> dict[str, Any]:
    """What a shard file depends on; kept in RUN_FILE and checked on resume. The test data and
    training puzzles by content, not path: puzzle ids are positions (make-qa's `G:n03:0007`),
    so test data made again holds other puzzles under the same ids, whose old answers must not
    be resumed; and a project folder moved elsewhere still resumes."""
    cfg = settings.settings
    return {
        "data": _content(settings.data),
        "backend": backend,
        "model": model_label(backend, settings),
        "train": _content(settings.train) if backend in TRAINED_BACKENDS else None,
        "num_shards": settings.num_shards,
        **{k: getattr(cfg, k) for k in _ANSWER_KEYS},
    }


def _content(path: Path | str) -> str:
    from cellpuzzle_cli.io import describe

    return f"sha256:{describe(Path(path))['sha256']}"


def _same(key: str, old: Any, new: Any, settings: PredictJob) -> bool:
    """Whether a recorded identity value matches; a run file from before identities held
    content names its files by path, and is compared as it was."""
    if key in ("data", "train") and isinstance(old, str) and not old.startswith("sha256:"):
        path = settings.data if key == "data" else settings.train
        return path is not None and old == str(Path(path).resolve())
    return old == new


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Shard files go beside other shards only, never into an unrelated folder."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"The output '{out_dir}' is a file. Give -o a folder.")
    visible = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
    if visible and not (out_dir / RUN_FILE).exists():
        raise UserError(f"The output folder '{out_dir}' already holds files that are not "
                        "predictions. Choose another folder with -o, or pass --overwrite to "
                        "write the shard files there anyway.")


def _check_resume(out_dir: Path, identity: dict[str, Any], overwrite: bool,
                  settings: PredictJob) -> None:
    """Refuse to append to shard files made with other settings or other test data (before
    anything is written)."""
    path = out_dir / RUN_FILE
    if overwrite or not path.exists():
        return
    try:
        old = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError:
        old = {}
    changed = [k for k in identity if not _same(k, old.get(k), identity[k], settings)]
    if changed:
        detail = "; ".join(f"{k}: {_shown(old.get(k))} -> {_shown(identity[k])}"
                           for k in changed)
        raise UserError(f"{out_dir} holds predictions made with other settings or data "
                        f"({detail}). "
                        "Resuming would mix them. Use another -o folder, or pass --overwrite "
                        "to predict this shard again with the new settings.")


def _shown(value: Any) -> str:
    """An identity value for a message: a content hash shortened, anything else as it is."""
    if isinstance(value, str) and value.startswith("sha256:"):
        return f"content {value[7:19]}…"
    return repr(value)


def _write_run_files(out_dir: Path, identity: dict[str, Any], settings: PredictJob,
                     set_size: int) -> None:
    """RUN_FILE: the identity, plus what `score` needs to tell a partial run (`--limit`): the
    size of the whole test set and the limit asked for (neither is checked on resume, so a
    run without --limit completes a limited one)."""
    from cellpuzzle_cli.config import save_settings

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RUN_FILE, {**identity, "trust_remote_code": settings.trust_remote_code,
                                    "limit": settings.limit, "puzzles_in_set": set_size})
    save_settings(out_dir, "predict", settings.settings)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


@dataclass
class _Outcome:
    generation: Generation | None
    error: str | None
    batch_size: int
    seconds: float


def generate_with_retry(backend: Backend, batch: list[dict[str, Any]]) -> list[_Outcome]:
    """Generate a batch; on failure split it in halves, down to single puzzles marked as errors."""
    t0 = time.perf_counter()
    try:
        gens = backend.generate(batch)
    except UserError:
        raise
    except RETRYABLE as exc:
        error = _short(exc)
    else:
        seconds = time.perf_counter() - t0
        if len(gens) != len(batch):
            raise TypeError(f"backend {backend.name} returned {len(gens)} answers for "
                            f"{len(batch)} prompts")
        return [_Outcome(g, None, len(batch), seconds) for g in gens]
    # Outside the except block, so the failed batch's tensors are no longer referenced.
    backend.recover()
    if len(batch) == 1:
        return [_Outcome(None, error, 1, time.perf_counter() - t0)]
    mid = len(batch) // 2
    return generate_with_retry(backend, batch[:mid]) + generate_with_retry(backend, batch[mid:])


def prediction_line(record: dict[str, Any], text: str | None, *, backend: str, model: str,
                    error: str | None = None, samples: Sequence[str] = (), batch_size: int = 1,
                    seconds: float = 0.0, prompt_tokens: int | None = None,
                    completion_tokens: int | None = None) -> dict[str, Any]:
    """One line of a shard file: the answer `text` (None when generation failed, see `error`)
    to `record`, with the gold answer and size copied from it so `score` needs no other file.

    The one place the line's fields and their order are defined; tests build lines with it.
    """
    row: dict[str, Any] = {
        "puzzle_id": record["puzzle_id"],
        "prediction": text,
        "answer": record.get("assistant_msg"),
        "n": puzzle_size(record),
        "n_candidates": candidate_count(record),
        "model": model,
        "backend": backend,
        "error": error,
        "batch_size": batch_size,
        "batch_seconds": round(seconds, 4),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    if len(samples) > 1:
        row["samples"] = list(samples)
    if record.get(IDS_FIELD) is not None:   # gold ontology IDs, for score's hierarchical metrics
        row[IDS_FIELD] = record[IDS_FIELD]
    return row


def _line(record: dict[str, Any], outcome: _Outcome, backend: str, model: str) -> dict[str, Any]:
    gen = outcome.generation
    if gen is None:
        return prediction_line(record, None, backend=backend, model=model, error=outcome.error,
                               batch_size=outcome.batch_size, seconds=outcome.seconds)
    return prediction_line(record, gen.texts[0], backend=backend, model=model,
                           error=outcome.error, samples=gen.texts,
                           batch_size=outcome.batch_size, seconds=outcome.seconds,
                           prompt_tokens=gen.prompt_tokens,
                           completion_tokens=gen.completion_tokens)


def run_predict(settings: PredictJob, progress: Progress | None = None,
                backend_obj: Backend | None = None) -> PredictResult:
    """Predict one shard (settings.shard_index of settings.num_shards), resuming its file.

    `backend_obj` replaces the backend built from the settings (benchmarks and tests).
    """
    check_settings(settings.settings)
    shard = Shard(settings.shard_index, settings.num_shards)
    parse_shard(str(shard))  # same checks as the CLI spec
    backend = backend_obj.name if backend_obj else resolve_backend(settings.settings.backend)
    if backend == "vllm" and backend_obj is None:
        from cellpuzzle_cli.predict.vllm_backend import import_vllm

        import_vllm()  # fail before any file is touched
    every = load_test_records(settings.data)
    whole_shard = select_shard(every, shard)
    records = select_shard(first_puzzles(every, settings.limit), shard)
    out_dir = Path(settings.output_dir)
    _check_output_dir(out_dir, settings.overwrite)
    identity = _run_identity(settings, backend)
    model = identity["model"]
    _check_resume(out_dir, identity, settings.overwrite, settings)
    shard_file = out_dir / shard.filename
    # Lines beyond --limit (from an earlier, larger run) are kept: work is never thrown away.
    done = {} if settings.overwrite else read_done(shard_file,
                                                   {r["puzzle_id"] for r in whole_shard})
    retried = settings.retry_errors and any(r.get("prediction") is None for r in done.values())
    if retried:
        done = {pid: row for pid, row in done.items() if row.get("prediction") is not None}
    pending = [r for r in records if r["puzzle_id"] not in done]
    chosen_done = sum(1 for r in records if r["puzzle_id"] in done)
    # The model loads before anything is written, so a wrong --model leaves nothing behind.
    impl = (backend_obj or make_backend(backend, settings)) if pending else None
    _write_run_files(out_dir, identity, settings, len(every))
    if settings.overwrite or retried:
        rewrite_in_order(shard_file, done.values())
    if progress:
        progress(advance=chosen_done, total=len(records))

    new_rows: list[dict[str, Any]] = []
    seconds = 0.0
    if impl is not None:
        batch_size = settings.settings.batch_size or impl.default_batch_size
        writer = ShardWriter(shard_file)
        # Longest prompts first: similar lengths share a batch, and an OOM shows up at once.
        pending.sort(key=impl.sort_key, reverse=True)
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            t0 = time.perf_counter()
            outcomes = generate_with_retry(impl, batch)
            seconds += time.perf_counter() - t0
            rows = [_line(r, o, backend, model) for r, o in zip(batch, outcomes)]
            writer.append(rows)
            new_rows.extend(rows)
            if progress:
                progress(advance=len(batch))
    all_rows = list(done.values()) + new_rows
    rewrite_in_order(shard_file, all_rows)
    answered = [r["prediction"] for r in all_rows if r.get("prediction") is not None]
    unreadable = [t for t in answered if not parse_answer(t).legitimate]
    warning = unreadable_warning(f"Shard {shard}", len(answered), len(unreadable),
                                 unreadable[0] if unreadable else None)
    return PredictResult(
        shard_file=shard_file, output_dir=out_dir, shard_index=shard.index,
        num_shards=shard.count, backend=backend, model=model, total=len(records),
        resumed=chosen_done, generated=len(new_rows),
        errors=sum(1 for r in all_rows if r.get("prediction") is None),
        seconds=seconds,
        prompt_tokens=sum(r.get("prompt_tokens") or 0 for r in new_rows),
        completion_tokens=sum(r.get("completion_tokens") or 0 for r in new_rows),
        warnings=[warning] if warning else [], limit=settings.limit,
        shard_puzzles=len(whole_shard), answered=len(all_rows))
