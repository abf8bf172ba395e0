"""What every prediction backend returns, and the one way prompts become model input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cellpuzzle_cli.prompts import record_messages


@dataclass
class Generation:
    """One puzzle's answer: `texts` holds the n samples (the first is the line's prediction)."""

    texts: list[str]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # summed over the n samples


class Backend(Protocol):
    name: str
    model_label: str
    default_batch_size: int

    def sort_key(self, record: dict[str, Any]) -> int:
        """Prompt length; batches are formed longest-first so padding is small."""

    def generate(self, records: list[dict[str, Any]]) -> list[Generation]:
        """Answers for `records`, in order; raises on failure (the caller retries smaller)."""

    def recover(self) -> None:
        """Free what a failed batch left behind (e.g. the CUDA cache) before a retry."""


def chat_prompt(tokenizer: Any, record: dict[str, Any]) -> str:
    """The prompt text exactly as training built it: prompts.record_messages + chat template."""
    return tokenizer.apply_chat_template(record_messages(record), add_generation_prompt=True,
                                         tokenize=False)


def prompt_token_ids(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    # The chat template already holds any special tokens; adding a BOS again would shift them.
    return tokenizer(chat_prompt(tokenizer, record), add_special_tokens=False)["input_ids"]


class TokenizedPrompts:
    """Prompt token ids per puzzle, computed once (sorting and generating both need them)."""

    tokenizer: Any

    def prompt_ids(self, record: dict[str, Any]) -> list[int]:
        cache = self.__dict__.setdefault("_prompt_cache", {})
        pid = record["puzzle_id"]
        if pid not in cache:
            cache[pid] = prompt_token_ids(self.tokenizer, record)
        return cache[pid]

    def sort_key(self, record: dict[str, Any]) -> int:
        return len(self.prompt_ids(record))


def check_prompt_fits(n_prompt: int, max_new_tokens: int, max_len: int | None,
                      puzzle_id: str) -> None:
    """Refuse a prompt that cannot fit the model's context instead of generating garbage."""
    if max_len is not None and n_prompt + max_new_tokens > max_len:
        raise ValueError(f"prompt of puzzle {puzzle_id} has {n_prompt} tokens; with "
                         f"max_new_tokens={max_new_tokens} it exceeds the model length {max_len}")
