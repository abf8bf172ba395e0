"""Settings of one predict run: generation knobs (configs/predict.yaml) plus paths and shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("auto", "hf", "vllm", "baseline", "celltypist")
# Backends that learn from the training split instead of loading a model.
TRAINED_BACKENDS = ("baseline", "celltypist")


@dataclass
class PredictConfig:
    """Keys of configs/predict.yaml; every one can be overridden as key=value."""

    backend: str = "auto"            # auto: vllm when installed and a GPU is visible, else hf
    batch_size: int | None = None    # None: the backend's default (hf 16, vllm 256, baseline 64)
    max_new_tokens: int = 1024
    min_new_tokens: int = 0          # >0 forces fixed-length answers (benchmarks only)
    temperature: float = 0.0         # 0: greedy
    top_p: float = 1.0
    n: int = 1                       # samples per puzzle; >1 needs temperature > 0
    seed: int = 0
    max_model_len: int | None = None # prompt + answer limit; None: the model's own
    dtype: str = "auto"              # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"             # hf backend: auto, cpu, cuda, cuda:1, ...
    tensor_parallel_size: int = 1    # vllm: GPUs per model copy
    gpu_memory_utilization: float = 0.9  # vllm


@dataclass
class PredictSettings:
    data: Path
    output_dir: Path
    model: Path | None = None
    train: Path | None = None        # baseline/celltypist: the puzzles they learn from
    expression: list[Path] = field(default_factory=list)  # celltypist: build-context's .h5ad
    shard_index: int = 0
    num_shards: int = 1
    overwrite: bool = False
    retry_errors: bool = False       # predict again the puzzles whose line holds an error
    trust_remote_code: bool = False
    config: PredictConfig = field(default_factory=PredictConfig)
