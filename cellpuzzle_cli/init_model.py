"""A tiny from-scratch Qwen2 model with a tokenizer trained on puzzle text.

Nothing can be downloaded here or in CI, so tests and the demo need a model the project can
make itself. The result is an ordinary Hugging Face folder (config, safetensors, tokenizer,
chat template, generation config): every command treats it like any downloaded model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cellpuzzle_cli.answer import TAGS as ANSWER_TAGS
from cellpuzzle_cli.config import Count, Seed, check_settings, save_settings
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress, atomic_output_dir
from cellpuzzle_cli.prompts import SYSTEM_PROMPT

if TYPE_CHECKING:
    from cellpuzzle_cli.runner import Job

EOS = "<|im_end|>"
PAD = "<|endoftext|>"
SPECIAL = [PAD, "<|im_start|>", EOS]

# ChatML, with {% generation %} so TRL can mask everything but the assistant's tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class InitModelSettings:
    """The shape of a from-scratch model: init-model's options, saved as init-model.yaml."""

    hidden_size: Count = 64
    layers: Count = 2
    heads: Count = 4  # key/value heads: half as many (grouped-query attention, as in Qwen2)
    intermediate_size: Count | None = None  # None: twice hidden_size
    vocab_size: Count = 4096  # BPE vocabulary; whole-word tokens come on top
    whole_words: bool = True  # gene symbols and cell-type names of the puzzles as single tokens
    min_gene_cells: Count = 2  # genes listed by fewer training cells stay BPE pieces
    max_position_embeddings: Count = 8192
    seed: Seed = 0

    def validate(self) -> None:
        if self.hidden_size % self.heads:
            raise UserError(f"hidden_size ({self.hidden_size}) must be a multiple of heads "
                            f"({self.heads}).")

    @property
    def kv_heads(self) -> int:
        return self.heads // 2 if self.heads % 2 == 0 else self.heads


def puzzle_words(records: Iterable[dict], min_gene_cells: int) -> list[str]:
    """The puzzles' candidate cell-type names, and the gene symbols that `min_gene_cells` or more
    distinct cells list; longest first.

    Added to the tokenizer as whole tokens, a cell type is one token the model can copy from
    the candidate list, instead of BPE pieces it can glue into a name that is no candidate.
    Rarer genes stay BPE pieces: held-out cells bring genes no training cell had, and a model
    that met BPE-spelled genes in training reads them as genes, where a whole token it never
    trained is noise (measured: held-out cell accuracy 0.37 with every gene whole, 0.56 with
    genes of one cell left to BPE; docs/benchmarks.md).
    """
    from collections import Counter

    from cellpuzzle_cli.prompts import parse_question

    types: set[str] = set()
    cells: set[tuple[str, ...]] = set()
    for record in records:
        genes, candidates = parse_question(str(record.get("user_msg") or ""))
        cells.update(tuple(g) for g in genes)
        types.update(candidates)
    listed_by = Counter(g for cell in cells for g in set(cell))
    words = types | {g for g, n in listed_by.items() if n >= min_gene_cells}
    return sorted((w for w in words if w.strip()), key=lambda w: (-len(w), w))


def train_tokenizer(texts: Iterable[str], vocab_size: int, words: Iterable[str] = ()):
    """A byte-level BPE tokenizer (as Qwen uses) trained on the given texts.

    `words` become whole tokens (matched before BPE, decoded verbatim, so names with spaces,
    '+' or '/' round-trip exactly); any other text still falls back to byte-level BPE.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts) + [SYSTEM_PROMPT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   unk_token=None, model_max_length=8192)
    fast.add_tokens(list(ANSWER_TAGS))
    fast.add_tokens([AddedToken(w, normalized=False) for w in words if w not in ANSWER_TAGS])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_model(out_dir: Path, texts: Iterable[str], config: InitModelSettings | None = None,
                     words: Iterable[str] = ()) -> int:
    """Write a randomly initialised tiny model + tokenizer to `out_dir`; returns its parameter count.

    `words` (see `puzzle_words`) become whole tokens when `config.whole_words` is set.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    cfg = check_settings(config or InitModelSettings())
    tokenizer = train_tokenizer(texts, cfg.vocab_size, words if cfg.whole_words else ())
    model_cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 2 * cfg.hidden_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(model_cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


@dataclass
class InitModelResult:
    out: Path
    parameters: int
    vocab_size: int
    n_texts: int


def init_tiny_model(data: Path, out: Path, config: InitModelSettings | None = None,
                    overwrite: bool = False, progress: Progress | None = None) -> InitModelResult:
    """A from-scratch tiny Qwen2 whose tokenizer is trained on the split's chat texts.

    The texts are the system, user and assistant messages of `data`; tiny_model adds the answer
    tags, the puzzles' gene and cell-type names (`config.whole_words`) and the chat template.
    The result is an ordinary model folder for `sft --model`.
    """
    import json

    from cellpuzzle_cli.training_data import read_training_records

    records = read_training_records(data)
    texts = [str(r[k]) for r in records for k in ("system_msg", "user_msg", "assistant_msg")
             if r.get(k)]
    if progress:
        progress(0, total=1, description="init-model")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        config = config or InitModelSettings()
        params = build_tiny_model(tmp, texts, config, puzzle_words(records, config.min_gene_cells))
        save_settings(tmp, "init-model", config)
        vocab = json.loads((tmp / "config.json").read_text())["vocab_size"]
    if progress:
        progress(1)
    return InitModelResult(out=Path(out), parameters=params, vocab_size=vocab, n_texts=len(texts))


def step(job: Job, progress: Progress) -> InitModelResult:
    """init-model as a pipeline step (see `runner`)."""
    return init_tiny_model(job.inputs["train"], job.output, job.settings,
                           overwrite=job.overwrite, progress=progress)
