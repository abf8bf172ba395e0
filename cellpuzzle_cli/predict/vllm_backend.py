"""vLLM backend: offline `vllm.LLM` on one or more GPUs (tensor parallel).

vLLM is an optional extra (Linux + CUDA), so it is imported only when this backend is chosen.
Prompts are tokenised here with the model's own chat template, exactly as the transformers
backend and training do, and handed to vLLM as token ids so nothing is templated twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.predict.base import Generation, TokenizedPrompts, check_prompt_fits
from cellpuzzle_cli.predict.settings import PredictSettings

INSTALL_HINT = "pip install 'cellpuzzle[gpu]'"


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise UserError(f"--backend vllm needs vLLM, which is not installed here ({exc}). Install "
                        f"the GPU extra on a Linux machine with CUDA: {INSTALL_HINT}. On CPU, use "
                        "--backend hf instead.") from exc
    return vllm


def sampling_kwargs(config: PredictSettings) -> dict[str, Any]:
    """SamplingParams arguments matching the transformers backend's generation settings."""
    kwargs: dict[str, Any] = {"n": config.n, "max_tokens": config.max_new_tokens,
                              "temperature": config.temperature, "seed": config.seed}
    if config.temperature > 0:
        kwargs["top_p"] = config.top_p
    if config.min_new_tokens:
        kwargs["min_tokens"] = config.min_new_tokens
    return kwargs


def llm_kwargs(model_dir: Path, config: PredictSettings, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": str(model_dir), "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization, "seed": config.seed,
        "trust_remote_code": trust_remote_code,
        "dtype": "auto" if config.dtype == "auto" else config.dtype,
    }
    if config.max_model_len:
        kwargs["max_model_len"] = config.max_model_len
    return kwargs


def to_generations(outputs: list[Any]) -> list[Generation]:
    """vLLM RequestOutputs -> Generations (texts of all n samples, token counts)."""
    return [Generation(texts=[c.text for c in out.outputs],
                       prompt_tokens=len(out.prompt_token_ids or []),
                       completion_tokens=sum(len(c.token_ids) for c in out.outputs))
            for out in outputs]


class VLLMBackend(TokenizedPrompts):
    name = "vllm"
    default_batch_size = 256  # vLLM schedules internally; batches only bound resume granularity

    def __init__(self, model_dir: Path, config: PredictSettings, trust_remote_code: bool = False):
        vllm = import_vllm()
        self.config = config
        self.model_label = str(Path(model_dir).resolve())
        self.llm = vllm.LLM(**llm_kwargs(model_dir, config, trust_remote_code))
        self.tokenizer = self.llm.get_tokenizer()
        engine_config = getattr(self.llm.llm_engine, "model_config", None)
        self.max_len = config.max_model_len or getattr(engine_config, "max_model_len", None)
        self.params = vllm.SamplingParams(**sampling_kwargs(config))

    def generate(self, records: list[dict[str, Any]]) -> list[Generation]:
        prompts = []
        for r in records:
            ids = self.prompt_ids(r)
            check_prompt_fits(len(ids), self.config.max_new_tokens, self.max_len, r["puzzle_id"])
            prompts.append({"prompt_token_ids": ids})
        return to_generations(self.llm.generate(prompts, self.params, use_tqdm=False))

    def recover(self) -> None:
        import gc

        gc.collect()
