"""Choosing and building a backend: hf (transformers), vllm, the baseline or CellTypist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.predict.base import Backend, Generation
from cellpuzzle_cli.predict.settings import BACKENDS, TRAINED_BACKENDS, PredictJob


def resolve_backend(name: str) -> str:
    """`auto` -> vllm when it is installed and a GPU is visible, else hf."""
    if name not in BACKENDS:
        raise UserError(f"Unknown backend '{name}'. Choose one of: {', '.join(BACKENDS)}.")
    if name != "auto":
        return name
    from cellpuzzle_cli.predict.vllm_backend import vllm_available

    if vllm_available():
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "hf"


def model_label(backend: str, settings: PredictJob) -> str:
    """What the `model` field of every line says (and what a resumed run must match)."""
    if backend in TRAINED_BACKENDS:
        return backend
    return str(Path(settings.model).resolve())


class BaselineAdapter:
    """The classical marker-gene baseline behind the same interface as the LLM backends."""

    name = "baseline"
    model_label = "baseline"
    default_batch_size = 64

    def __init__(self, train_path: Path):
        try:
            from cellpuzzle_cli.baseline import BaselineBackend
        except ImportError as exc:
            raise UserError("The baseline backend is not part of this installation "
                            f"({exc}). Use --backend hf or vllm.") from exc
        from cellpuzzle_cli.io import read_records

        self.inner = BaselineBackend(read_records(train_path))

    def sort_key(self, record: dict[str, Any]) -> int:
        return 0

    def generate(self, records: list[dict[str, Any]]) -> list[Generation]:
        return [Generation([text]) for text in self.inner.generate(records)]

    def recover(self) -> None:
        pass


def make_backend(backend: str, settings: PredictJob) -> Backend:
    if backend == "baseline":
        if settings.train is None:
            raise UserError("--backend baseline learns from training puzzles: pass --train FILE "
                            "(a split's train.jsonl).")
        return BaselineAdapter(settings.train)
    if backend == "celltypist":
        from cellpuzzle_cli.io import read_records
        from cellpuzzle_cli.predict.celltypist_backend import CellTypistBackend

        if settings.train is None:
            raise UserError("--backend celltypist learns from the training split's cells: pass "
                            "--train FILE (a split's train.jsonl).")
        return CellTypistBackend(read_records(settings.train), settings.expression)
    if settings.model is None:
        raise UserError(f"--backend {backend} needs a model: pass --model DIR (a Hugging Face "
                        "model folder from merge-lora, convert-ckpt or init-model).")
    if backend == "vllm":
        from cellpuzzle_cli.predict.vllm_backend import VLLMBackend

        return VLLMBackend(settings.model, settings.settings, settings.trust_remote_code)
    from cellpuzzle_cli.predict.hf_backend import HFBackend

    return HFBackend(settings.model, settings.settings, settings.trust_remote_code)
