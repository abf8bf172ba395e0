"""Supervised fine-tuning: TRL's SFTTrainer with a PEFT LoRA (or DoRA) adapter.

Prompts: every example is built with `prompts.record_messages` — a `system` turn (the record's
`system_msg`, or the shipped system prompt) and a `user` turn with the puzzle — the same turns
`to-parquet` gives the RL trainer and `predict` gives the model, so a model is always asked the
way it was taught. The assistant turn is the target (`rationale.py` adds a `<think>` block when
the data has none).

Loss on the assistant turn only, for any chat template: examples use TRL's conversational
prompt/completion format (prompt = system + user turns, completion = the assistant turn). TRL
renders the prompt with the generation prompt, renders prompt + completion, and masks the
prompt's tokens; this needs no `{% generation %}` markers in the template, so any Hugging Face
chat model works, not only the ones this project makes.

Checkpoints go to a stable hidden folder beside the output (`.NAME.checkpoints`), so an
interrupted run can continue with `--resume`; the adapter folder itself only appears, complete,
when training has finished.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from cellpuzzle_cli.config import (
    Check,
    Count,
    Fraction,
    NonNegative,
    Rate,
    Seed,
    check_settings,
    one_of,
    save_settings,
)
from cellpuzzle_cli.device import cuda_available, use_bf16
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress, atomic_output_dir
from cellpuzzle_cli.prompts import record_messages
from cellpuzzle_cli.rationale import MODES as RATIONALE_MODES
from cellpuzzle_cli.training_data import holdout, read_training_records

if TYPE_CHECKING:
    from cellpuzzle_cli.curriculum import Schedule
    from cellpuzzle_cli.runner import Job

FINETUNE_MODES = ("lora", "full")
# Unset logging_steps / eval_steps: a share of the run's steps (transformers reads a value below
# 1 so), so a curve has ~50 logged points (every step in runs up to 50) and ~10 evaluations.
LOG_SHARE, EVAL_SHARE = 0.02, 0.1
NonNegativeFloat = Annotated[float, Check(0)]  # config.NonNegative is for counts


@dataclass
class SftSettings:
    """Every key `configs/sft.yaml` and `key=value` overrides may set (Cell-o1's recipe by
    default); saved as sft.yaml beside the adapter, reloadable with --config."""

    # what is trained
    finetune: Annotated[str, one_of(*FINETUNE_MODES)] = "lora"  # full: every weight (a tiny model)
    completion_only_loss: bool = True  # false: loss on the prompt too (a from-scratch model)
    # adapter
    lora_r: Count = 256
    lora_alpha: Count | None = None  # None: 2 * lora_r
    lora_dropout: Fraction = 0.05
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    modules_to_save: list[str] | None = None  # trained in full, e.g. [embed_tokens] for a tiny model
    # optimisation
    learning_rate: Rate = 5e-5
    num_train_epochs: Annotated[float, Check(above=0)] = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: Count = 1
    per_device_eval_batch_size: Count = 1
    gradient_accumulation_steps: Count = 8
    warmup_steps: NonNegativeFloat = 0.03  # below 1: a fraction of the training steps
    lr_scheduler_type: str = "cosine"  # one of transformers' SchedulerType values
    weight_decay: NonNegativeFloat = 0.0
    max_grad_norm: Annotated[float, Check(above=0)] = 1.0
    max_length: Count = 4096
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: bf16 exactly where CUDA supports it
    # data
    eval_size: NonNegativeFloat = 0.05  # below 1: a fraction of the puzzles; else a count; 0: no eval
    rationale: Annotated[str, one_of(*RATIONALE_MODES)] = "template"  # see rationale.py
    rationale_genes: NonNegative = 3  # 0: bare `Cell i -> type` lines
    seed: Seed = 0
    curriculum: str | None = None  # stages by N, e.g. 3-5:400,3-8:rest (see curriculum.py)
    # logging and checkpoints
    logging_steps: Count | None = None  # None: ~50 points over the run (every step up to 50)
    eval_steps: Count | None = None     # None: ~10 evaluations over the run (with eval_size > 0)
    save_steps: Count = 200
    save_total_limit: Count = 2
    keep_checkpoints: bool = False

    def validate(self) -> None:
        if self.max_steps != -1 and self.max_steps < 1:
            raise UserError(f"'max_steps' must be -1 (train for num_train_epochs) or at least 1, "
                            f"got {self.max_steps}.")
        from transformers.trainer_utils import SchedulerType

        choices = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in choices:
            raise UserError(f"'lr_scheduler_type' must be one of {', '.join(choices)} "
                            f"(transformers' schedulers), got {self.lr_scheduler_type!r}.")
        self.stage_lengths()

    def stage_lengths(self) -> list[int] | None:
        """Steps per curriculum stage (None without one); a malformed plan is refused."""
        if self.curriculum is None:
            return None
        from cellpuzzle_cli.curriculum import fixed_lengths, parse_plan

        return fixed_lengths(parse_plan(self.curriculum), self.max_steps if self.max_steps > 0
                             else None, "curriculum", "max_steps", "sft has no reward")


@dataclass
class SftResult:
    out: Path
    base_model: str
    data: Path
    n_train: int
    n_eval: int
    steps: int
    train_loss: float
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    runtime_s: float
    device: str
    bf16: bool
    trainable_params: int
    resumed_from: str | None = None
    rationale_counts: dict[str, int] = field(default_factory=dict)
    processes: int = 1  # torchrun's world size
    finetune: str = "lora"
    logging_interval: int = 0   # steps between logged points (derived when not set)
    notes: list[str] = field(default_factory=list)
    curriculum: list[dict[str, Any]] | None = None  # per stage: sizes, steps, N mix, loss

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps about the run (timings apart: see timings.json)."""
        return {"steps": self.steps, "train_loss": self.train_loss, "first_loss": self.first_loss,
                "last_loss": self.last_loss, "eval_loss": self.eval_loss,
                "n_train": self.n_train, "n_eval": self.n_eval, "bf16": self.bf16,
                "device": self.device, "trainable_params": self.trainable_params,
                "targets": self.rationale_counts, "processes": self.processes,
                "logging_interval": self.logging_interval,
                **({"curriculum": self.curriculum} if self.curriculum else {})}


def sft_examples(records: Sequence[dict[str, Any]], targets: Sequence[str]) -> list[dict[str, Any]]:
    """TRL conversational prompt/completion examples (see the module docstring for why)."""
    return [{"prompt": record_messages(rec),
             "completion": [{"role": "assistant", "content": target}]}
            for rec, target in zip(records, targets)]


def prepare_examples(records: Sequence[dict[str, Any]], settings: SftSettings
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Train and eval examples with rationale targets fitted on the training part only."""
    from cellpuzzle_cli.rationale import build_targets

    check_settings(settings)
    train, val = holdout(records, settings.eval_size, settings.seed)
    train_targets, counts = build_targets(train, settings.rationale, fit_on=train,
                                          k=settings.rationale_genes)
    val_targets, _ = build_targets(val, settings.rationale, fit_on=train, k=settings.rationale_genes)
    return sft_examples(train, train_targets), sft_examples(val, val_targets), counts


# -- model ----------------------------------------------------------------------------------
def model_source(model: str | Path) -> str:
    """A local folder as an absolute path (so the adapter remembers it), else a hub id as given."""
    p = Path(model)
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a Hugging Face model folder (no config.json). Pass a model "
                            "folder, e.g. one made by `cellpuzzle init-model --tiny`.")
        return str(p.resolve())
    return str(model)


def load_tokenizer(source: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load a tokenizer from '{source}' ({exc}). Give a local model "
                        "folder (nothing is downloaded offline), and --trust-remote-code only if "
                        "you trust its code.") from exc
    if not tok.chat_template:
        raise UserError(f"The tokenizer of '{source}' has no chat template, and sft trains with the "
                        "model's own template. Use a chat/instruct model or add a chat_template to "
                        "its tokenizer_config.json.")
    return tok


def lora_config(settings: SftSettings):
    """The PEFT adapter `finetune=lora` trains, or None for `finetune=full`."""
    if settings.finetune == "full":
        return None
    from peft import LoraConfig

    # copies: PEFT extends these lists in place, which would leak into the saved config
    targets = settings.target_modules
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha or 2 * settings.lora_r,
                      lora_dropout=settings.lora_dropout,
                      target_modules=list(targets) if isinstance(targets, list) else targets,
                      use_dora=settings.use_dora,
                      modules_to_save=list(settings.modules_to_save or []) or None,
                      ensure_weight_tying=bool(settings.modules_to_save), task_type="CAUSAL_LM")


def make_trainer(source: str, train_examples: list[dict], eval_examples: list[dict],
                 settings: SftSettings, work_dir: Path, trust_remote_code: bool = False,
                 callbacks: Sequence[Any] = (), schedule: Schedule | None = None):
    """An SFTTrainer with a fresh LoRA adapter (or the whole model, `finetune=full`); separate
    from training so tests can inspect it. With a curriculum `schedule`, `train_examples` are
    already in stage order and transformers' sequential sampler reads them so."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from cellpuzzle_cli.curriculum import boundary_logger

    # SFTTrainer wraps the model in LoRA before the Trainer seeds anything: seed here, or the
    # adapter's initial weights (and so every run) differ.
    set_seed(settings.seed)
    bf16 = use_bf16(settings.bf16)
    tokenizer = load_tokenizer(source, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.bfloat16 if bf16 else torch.float32,
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load a causal language model from '{source}' ({exc}).") from exc
    has_eval = bool(eval_examples)
    args = SFTConfig(
        output_dir=str(work_dir), seed=settings.seed, data_seed=settings.seed,
        learning_rate=settings.learning_rate, num_train_epochs=settings.num_train_epochs,
        max_steps=schedule.total if schedule else settings.max_steps,
        train_sampling_strategy="sequential" if schedule else "random",
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        warmup_steps=settings.warmup_steps, lr_scheduler_type=settings.lr_scheduler_type,
        weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
        max_length=settings.max_length, gradient_checkpointing=settings.gradient_checkpointing,
        bf16=bf16, fp16=False, completion_only_loss=settings.completion_only_loss,
        assistant_only_loss=False,
        logging_steps=settings.logging_steps or LOG_SHARE, save_strategy="steps",
        save_steps=settings.save_steps, save_total_limit=settings.save_total_limit,
        eval_strategy="steps" if has_eval else "no", eval_steps=settings.eval_steps or EVAL_SHARE,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=not cuda_available(),
    )
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_examples),
                             eval_dataset=Dataset.from_list(eval_examples) if has_eval else None,
                             processing_class=tokenizer, peft_config=lora_config(settings),
                             callbacks=[*callbacks, *([boundary_logger(schedule.ends)]
                                                      if schedule else [])])
    except ValueError as exc:
        if "Target modules" in str(exc) or "target_modules" in str(exc):
            raise UserError(f"LoRA target_modules={settings.target_modules!r} match no layer of "
                            f"'{source}' ({exc}). Use target_modules=all-linear or that model's "
                            "layer names.") from exc
        raise
    trainer.remove_callback(PrinterCallback)  # services never print; losses go to the log
    return trainer


# -- checkpoints and outputs ----------------------------------------------------------------
def checkpoint_dir(out: Path) -> Path:
    """The stable work folder beside `out` that survives an interrupted run."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoints"


def latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir()
             and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def _prepare_work_dir(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check the output and work folders before any training; returns the checkpoint to resume."""
    work = checkpoint_dir(out)
    out_busy = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if resume:
        ckpt = latest_checkpoint(work)
        if ckpt is None and (kept := latest_checkpoint(out / "checkpoints")) is not None:
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(out / "checkpoints", work)
            ckpt = work / kept.name
        if ckpt is None:
            raise UserError(f"--resume found no checkpoint in {work} or {out / 'checkpoints'}. "
                            "Run without --resume to start a new training run.")
        return ckpt
    if out_busy and not overwrite:
        raise UserError(f"The output folder '{out}' already holds results. Choose another folder "
                        "with -o, pass --overwrite to replace it, or --resume to continue its run.")
    if latest_checkpoint(work) is not None and not overwrite:
        raise UserError(f"An interrupted run left checkpoints in {work}. Pass --resume to continue "
                        "it, or --overwrite to start over.")
    shutil.rmtree(work, ignore_errors=True)
    return None


def _losses(log_history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    losses = [e["loss"] for e in log_history if "loss" in e]
    return (losses[0], losses[-1]) if losses else (None, None)


def run_sft(model: str | Path, data: Path, out: Path, settings: SftSettings, *,
            resume: bool = False, overwrite: bool = False, trust_remote_code: bool = False,
            progress: Progress | None = None) -> SftResult:
    """Train on `data`; write the adapter (or, `finetune=full`, the whole model), tokenizer,
    settings (sft.yaml) and training curves to `out`.

    Under torchrun every process trains; only the main one prepares the checkpoint folder and
    writes the output.
    """
    from cellpuzzle_cli import curriculum, curves
    from cellpuzzle_cli.distributed import is_main_process, world_size

    out = Path(out)
    records = read_training_records(data)
    source = model_source(model)
    train_ex, eval_ex, counts = prepare_examples(records, settings)
    n_train, schedule = len(train_ex), curriculum.sft_schedule(records, settings, data, world_size())
    if schedule is not None:
        train_ex = [train_ex[i] for i in schedule.order]
    main = is_main_process()
    work = checkpoint_dir(out)
    if main:
        ckpt = _prepare_work_dir(out, resume, overwrite)
    else:
        ckpt = latest_checkpoint(work) if resume else None
    callbacks = [curves.finite_guard("sft"), curves.eval_leaves_training_alone(),
                 *([curves.progress_callback(progress)] if progress and main else [])]
    trainer = make_trainer(source, train_ex, eval_ex, settings, work, trust_remote_code, callbacks,
                           schedule)
    t0 = time.perf_counter()
    try:
        train_out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except BaseException:
        if main and latest_checkpoint(work) is None:  # nothing to resume from: leave nothing
            shutil.rmtree(work, ignore_errors=True)
        raise
    runtime = time.perf_counter() - t0
    eval_loss = trainer.evaluate()["eval_loss"] if eval_ex else None
    first, last = _losses(trainer.state.log_history)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    notes = _adapter_note(trainer.model, trainable, settings)
    result = SftResult(out=out, base_model=source, data=Path(data), n_train=n_train,
                       n_eval=len(eval_ex), steps=trainer.state.global_step,
                       train_loss=float(train_out.training_loss), first_loss=first,
                       last_loss=last, eval_loss=eval_loss, runtime_s=runtime,
                       device=str(trainer.args.device), bf16=bool(trainer.args.bf16),
                       trainable_params=trainable, resumed_from=str(ckpt) if ckpt else None,
                       rationale_counts=counts, processes=world_size(),
                       finetune=settings.finetune,
                       logging_interval=int(trainer.state.logging_steps or 0), notes=notes,
                       curriculum=schedule and curriculum.summary(schedule,
                                                                  trainer.state.log_history))
    if not main:
        return result
    with atomic_output_dir(out, overwrite=overwrite or resume) as tmp:
        trainer.model.save_pretrained(tmp)
        if settings.finetune == "lora":
            sort_adapter_module_lists(tmp / "adapter_config.json")
        trainer.processing_class.save_pretrained(tmp)
        save_settings(tmp, "sft", settings)
        curves.write_curves(tmp, trainer.state.log_history, f"sft ({settings.finetune})",
                     extra=schedule and curriculum.step_extras(schedule, trainer.state.log_history))
        if settings.keep_checkpoints and work.exists():
            shutil.move(str(work), tmp / "checkpoints")
    shutil.rmtree(work, ignore_errors=True)
    return result


def _adapter_note(model: Any, trainable: int, settings: SftSettings) -> list[str]:
    """Why an adapter can hold more parameters than the model it adapts (a tiny model with
    Cell-o1's lora_r=256): said, so the count does not read as a bug."""
    if settings.finetune != "lora":
        return []
    base = sum(p.numel() for p in model.parameters()) - trainable
    if trainable <= base:
        return []
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    width = f" (hidden size {hidden})" if hidden else ""
    note = (f"The adapter has {trainable:,} trainable parameters, more than the {base:,} of the "
            f"model it adapts: lora_r={settings.lora_r} is wider than the model's layers{width}, "
            "so each low-rank pair outgrows the weight it updates. For a model this small, lower "
            "lora_r (e.g. lora_r=8) or train every weight (finetune=full).")
    return [note]


def sort_adapter_module_lists(path: Path) -> None:
    """PEFT writes module-name sets in hash order; sorted, the same run gives the same bytes."""
    import json

    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# -- the pipeline step ----------------------------------------------------------------------
def launch(job: Job) -> int | None:
    """`--nproc-per-node N`: run this very command as N processes under torchrun (its exit
    code), unless this process is already one of them."""
    from cellpuzzle_cli.distributed import relaunch, world_size

    nproc = job.flag("nproc_per_node", 1)
    if nproc > 1 and world_size() == 1:
        return relaunch(nproc, list(job.flag("argv", ())))
    return None


def plan(job: Job) -> None:
    """The base model is recorded as an absolute folder (or the hub id as given)."""
    job.params["model"] = model_source(job.inputs["base_model"])


def step(job: Job, progress: Progress) -> SftResult:
    """sft as a pipeline step (see `runner`)."""
    return run_sft(job.inputs["base_model"], job.inputs["train"], job.output, job.settings,
                   resume=job.flag("resume", False), overwrite=job.overwrite,
                   trust_remote_code=job.flag("trust_remote_code", False), progress=progress)
