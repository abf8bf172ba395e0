"""transformers backend: batched generation on CPU or one GPU.

Cell-o1 generated one prompt at a time; here prompts are batched with left padding (so every
row's answer starts at the same position), grouped by length to keep padding small, with the
KV cache on and bfloat16 on CUDA.

On CPU, models with grouped-query attention (all Qwen2/2.5 sizes) use a variant of
transformers' SDPA attention: with a padding mask, transformers copies the key/value cache
once per query group at every step, which made batched decoding barely faster than one
prompt at a time; torch's `enable_gqa` gives the same numbers without the copy.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from cellpuzzle_cli.device import cpu_threads, pick_device, torch_dtype
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.predict.base import Generation, TokenizedPrompts, check_prompt_fits
from cellpuzzle_cli.predict.settings import PredictSettings

GQA_ATTENTION = "cellpuzzle_sdpa_gqa"


def _sdpa_gqa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    import torch

    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=False, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model) -> bool:
    """Switch a CPU model from `sdpa` to the copy-free grouped variant, where it applies."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    cfg = model.config
    grouped = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) < getattr(
        cfg, "num_attention_heads", 0)
    torch_ok = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
    if not (grouped and torch_ok and getattr(cfg, "_attn_implementation", None) == "sdpa"):
        return False
    AttentionInterface.register(GQA_ATTENTION, _sdpa_gqa_forward)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GQA_ATTENTION)
    return True


class HFBackend(TokenizedPrompts):
    name = "hf"
    default_batch_size = 16

    def __init__(self, model_dir: Path, config: PredictSettings, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.model_label = str(Path(model_dir).resolve())
        self.device = pick_device(config.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir,
                                                           trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch_dtype(config.dtype, self.device),
                trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"Could not load a model from {model_dir} ({exc}). Give --model a "
                            "Hugging Face model folder (e.g. from merge-lora or convert-ckpt); "
                            "models with custom code also need --trust-remote-code.") from exc
        if self.tokenizer.chat_template is None:
            raise UserError(f"The tokenizer in {model_dir} has no chat template, so prompts "
                            "cannot be built the way training built them. Use a chat model "
                            "folder (merge-lora and convert-ckpt keep the template).")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(self.device).eval()
        if self.device == "cpu":
            cpu_threads()
            use_grouped_sdpa(self.model)
        limits = [config.max_model_len, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_len = min((x for x in limits if x), default=None)
        self.generation_config = self._generation_config()
        self._torch = torch

    def _generation_config(self):
        from transformers import GenerationConfig

        cfg = self.config
        sample = cfg.temperature > 0
        eos = self.model.generation_config.eos_token_id
        return GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens or None,
            do_sample=sample, temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None, top_k=None if not sample else 0,
            num_return_sequences=cfg.n, use_cache=True,
            eos_token_id=eos if eos is not None else self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id)

    def generate(self, records: list[dict[str, Any]]) -> list[Generation]:
        torch = self._torch
        ids = [self.prompt_ids(r) for r in records]
        for r, x in zip(records, ids):
            check_prompt_fits(len(x), self.config.max_new_tokens, self.max_len, r["puzzle_id"])
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # A seed per batch content: a resumed run samples what the uninterrupted one would.
        seed = zlib.crc32("\0".join(r["puzzle_id"] for r in records).encode()) ^ self.config.seed
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=self.generation_config)
        new = out[:, batch["input_ids"].shape[1]:].cpu()
        eos = self.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        n = self.config.n
        results = []
        for i, x in enumerate(ids):
            texts, used = [], 0
            for row in new[i * n:(i + 1) * n].tolist():
                length = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
                used += length
                texts.append(self.tokenizer.decode(row[:length], skip_special_tokens=True))
            results.append(Generation(texts, len(x), used))
        return results

    def recover(self) -> None:
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
