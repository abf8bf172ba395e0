"""`--backend hf|vllm`: a trained cellpuzzle model labels the clusters by answering puzzles.

Each cluster's cells are listed by their top genes as the model's training cells were (the
same number of genes), dealt into many puzzles with other clusters' cells and random candidate
lists (`puzzle_votes`), and answered through predict's own machinery (`predict.shard_run`:
batched, and resumable from a work folder beside the output, so a killed run picks up where it
stopped). The votes become each cluster's probabilities: its share for a type (chosen / offered)
over the sum of its shares, so one type standing out means a confident label, and scattered
votes (a type absent from the candidates) mean a low one.

What the model was taught with (its cell types, puzzle size, genes per cell, system message,
context paragraph) comes from its training puzzles, which the ledger finds upstream of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.annotate.evidence import Evidence
from cellpuzzle_cli.annotate.puzzle_votes import PuzzleShape, Votes, tally, vote_puzzles
from cellpuzzle_cli.annotate.query import QueryFile
from cellpuzzle_cli.annotate.settings import AnnotateSettings
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress

DEFAULT_SHAPE = PuzzleShape(4, 4)
DEFAULT_TOP_GENES = 50


@dataclass
class TrainedModel:
    """A model folder and what it was taught with (None where unknown)."""

    path: Path
    types: list[str]
    shape: PuzzleShape
    top_genes: int
    system_msg: str | None = None
    context: str = ""


def trained_model(path: Path, training: Path | None) -> TrainedModel:
    """The model at `path` and, from its training puzzles, how to ask it."""
    from cellpuzzle_cli.answer import answer_items, record_answer
    from cellpuzzle_cli.io import read_records
    from cellpuzzle_cli.prompts import parse_question, record_candidates, record_question

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json), so it "
                        "cannot answer puzzles. Give --model the folder `cellpuzzle sft`, "
                        "merge-lora, rl or convert-ckpt wrote.")
    if training is None:
        return TrainedModel(path, [], DEFAULT_SHAPE, DEFAULT_TOP_GENES)
    records = read_records(training)
    types = sorted({t for r in records for t in answer_items(record_answer(r))}, key=str.lower)
    sizes = Counter(int(r.get("n") or len(answer_items(record_answer(r)))) for r in records)
    cells = max(sizes, key=lambda n: (sizes[n], n))
    extra = max((len(record_candidates(r)) - int(r.get("n") or 0) for r in records), default=0)
    question = record_question(records[0])
    genes = parse_question(question)[0]
    context = question.split("\nCell 1:")[0].strip() if "\nCell 1:" in question else ""
    return TrainedModel(path, types, PuzzleShape(cells, cells + max(0, extra)),
                        len(genes[0]) if genes else DEFAULT_TOP_GENES,
                        records[0].get("system_msg"), context)


class ModelBackend:
    """Votes of a trained model, per cluster; `evidence` gives every cell its cluster's."""

    def __init__(self, model: TrainedModel, types: list[str], settings: AnnotateSettings,
                 work: Path, trust_remote_code: bool = False):
        self.name = settings.backend
        self.model_label = str(model.path)
        self.model, self.types, self.settings = model, list(types), settings
        self.work, self.trust_remote_code = Path(work), trust_remote_code
        self.unreadable = 0
        self.answered = 0

    def evidence(self, query: QueryFile, clusters: np.ndarray, n_clusters: int, pool: Any,
                 progress: Progress | None) -> Evidence:
        cells = self._cluster_cells(query, clusters, n_clusters)
        shape = PuzzleShape(self.settings.puzzle_cells or self.model.shape.cells,
                            self.settings.puzzle_candidates or self.model.shape.candidates)
        names = [str(c) for c in range(n_clusters)]
        records = vote_puzzles({str(c): cells[c] for c in range(n_clusters)}, self.types, shape,
                               self.settings.puzzles_per_cluster, self.settings.seed,
                               self.settings.context or self.model.context,
                               self.model.system_msg)
        answers = self._answer(query, records, progress)
        votes = tally(records, answers, names, self.types)
        self.answered += votes.answered
        self.unreadable += votes.unreadable
        prob = _probabilities(votes)[clusters]
        return Evidence(prob, _markers(cells), reasons=votes.reason_for_best(), per_cluster=True,
                        empty=query.unexpressed())

    def _cluster_cells(self, query: QueryFile, clusters: np.ndarray,
                       n_clusters: int) -> list[list[list[str]]]:
        """Up to `cells_per_cluster` seeded cells of each cluster, as top-gene lists."""
        from cellpuzzle_cli.build_context.topk import topk_csr

        rng = np.random.default_rng([self.settings.seed, 7])
        picked = []
        for c in range(n_clusters):
            members = np.flatnonzero(clusters == c)
            take = min(members.size, self.settings.cells_per_cluster)
            picked.append(np.sort(rng.choice(members, take, replace=False)))
        rows = np.unique(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
        block = query.read(rows).tocsr()
        lengths, genes = topk_csr(block.indptr, block.indices, block.data, self.model.top_genes)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        lists = {int(r): [str(query.genes[g]) for g in genes[starts[i]:starts[i + 1]]]
                 for i, r in enumerate(rows)}
        return [[lists[int(r)] for r in rows_c if lists[int(r)]] or [["(no expressed gene)"]]
                for rows_c in picked]

    def _answer(self, query: QueryFile, records: list[dict[str, Any]],
                progress: Progress | None) -> dict[str, str | None]:
        """The model's answer to every puzzle, through predict (resumable in the work folder).

        The folder is named after what decides the answers (the puzzles' bytes, the model, the
        generation settings), so a rerun resumes only the very same questions: answers to
        other cells or candidates (an earlier run on another query, other clusters or
        settings) are never taken for these, and are removed. A folder that holds no answer
        yet is removed when the run fails, so a failed start leaves nothing behind."""
        from cellpuzzle_cli.io import dumps_line, iter_jsonl, write_jsonl
        from cellpuzzle_cli.predict.settings import PredictJob, PredictSettings
        from cellpuzzle_cli.predict.shard_run import run_predict

        generation = PredictSettings(backend=self.name, max_new_tokens=self.settings.max_new_tokens,
                                     batch_size=self.settings.batch_size, seed=self.settings.seed)
        digest = hashlib.sha256(b"".join(dumps_line(r) for r in records))
        digest.update(f"{Path(self.model.path).resolve()}|{generation}".encode())
        mine = self.work / query.output.replace("/", "_")
        folder = mine / digest.hexdigest()[:16]
        for stale in (p for p in (mine.iterdir() if mine.is_dir() else ()) if p != folder):
            shutil.rmtree(stale, ignore_errors=True)
        puzzles = folder / "puzzles.jsonl"
        write_jsonl(puzzles, records)
        job = PredictJob(data=puzzles, output_dir=folder / "answers", model=self.model.path,
                         settings=generation, trust_remote_code=self.trust_remote_code)
        try:
            result = run_predict(job, progress)
        except BaseException:
            if not any(p.stat().st_size for p in folder.glob("answers/shard-*.jsonl")):
                shutil.rmtree(folder, ignore_errors=True)
                for empty in (mine, self.work):
                    with contextlib.suppress(OSError):
                        empty.rmdir()
            raise
        return {row["puzzle_id"]: row.get("prediction") for row in iter_jsonl(result.shard_file)}

    def finished(self) -> None:
        """The annotation is published: the work folder has served its purpose."""
        shutil.rmtree(self.work, ignore_errors=True)


def _probabilities(votes: Votes) -> np.ndarray:
    """Per cluster: shares normalised to sum to 1 over the types; "none" where no vote came."""
    shares = votes.shares()
    total = shares.sum(axis=1, keepdims=True)
    prob = np.zeros((shares.shape[0], shares.shape[1] + 1), dtype=np.float32)
    prob[:, :-1] = np.divide(shares, total, out=np.zeros_like(shares), where=total > 0)
    prob[:, -1] = (total[:, 0] == 0).astype(np.float32)
    return prob


def _markers(cells: list[list[list[str]]], shown: int = 5):
    """A cluster's markers: the genes most often in its sampled cells' lists."""
    def markers(cluster: int, _type: int) -> list[str]:
        counts = Counter(g for genes in cells[cluster] for g in genes)
        return [g for g, _ in counts.most_common(shown)]

    return markers
