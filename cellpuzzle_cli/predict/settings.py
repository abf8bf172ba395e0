"""Settings of one predict run: generation knobs (configs/predict.yaml) plus paths and shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from cellpuzzle_cli.config import Check, Count, NonNegative, Seed, Share, one_of
from cellpuzzle_cli.device import Dtype, dtype_name
from cellpuzzle_cli.errors import UserError

BACKENDS = ("auto", "hf", "vllm", "baseline", "celltypist")
# Backends that learn from the training split instead of loading a model.
TRAINED_BACKENDS = ("baseline", "celltypist")


@dataclass
class PredictSettings:
    """Keys of configs/predict.yaml; every one can be overridden as key=value (saved as
    predict.yaml beside the predictions)."""

    backend: Annotated[str, one_of(*BACKENDS)] = "auto"  # auto: vllm with a GPU, else hf
    batch_size: Count | None = None  # None: the backend's default (hf 16, vllm 256, baseline 64)
    max_new_tokens: Count = 1024
    min_new_tokens: NonNegative = 0  # >0 forces fixed-length answers (benchmarks only)
    temperature: Annotated[float, Check(0)] = 0.0  # 0: greedy
    top_p: Share = 1.0
    n: Count = 1                     # samples per puzzle; >1 needs temperature > 0
    seed: Seed = 0
    max_model_len: Count | None = None  # prompt + answer limit; None: the model's own
    dtype: Dtype = "auto"            # auto: bfloat16 where supported, float16 on other GPUs
    device: str = "auto"             # hf backend: auto, cpu, cuda, cuda:1, ...
    tensor_parallel_size: Count = 1  # vllm: GPUs per model copy
    gpu_memory_utilization: Share = 0.9  # vllm

    def __post_init__(self) -> None:
        self.dtype = dtype_name(self.dtype)

    def validate(self) -> None:
        if self.n > 1 and self.temperature <= 0:
            raise UserError(f"n={self.n} samples with temperature 0 would be {self.n} copies of "
                            "the greedy answer. Set --temperature above 0 (e.g. 0.7) or use "
                            "--n 1.")


@dataclass
class PredictJob:
    data: Path
    output_dir: Path
    model: Path | None = None
    train: Path | None = None        # baseline/celltypist: the puzzles they learn from
    expression: list[Path] = field(default_factory=list)  # celltypist: build-context's .h5ad
    shard_index: int = 0
    num_shards: int = 1
    overwrite: bool = False
    retry_errors: bool = False       # predict again the puzzles whose line holds an error
    limit: int | None = None         # only the first N puzzles of the set (shards.first_puzzles)
    trust_remote_code: bool = False
    settings: PredictSettings = field(default_factory=PredictSettings)
