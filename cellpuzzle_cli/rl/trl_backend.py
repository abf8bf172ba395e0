"""TRL backend: GRPO on one machine (CPU or one GPU) with the same verl keys and our reward.

verl's settings map onto GRPOConfig: prompts per step x rollout.n become TRL's generation
batch, the actor's micro batch its per-device batch and mini batch / micro batch its gradient
accumulation, so one verl "step" and one TRL generation round see the same samples. Every
reward call is also written to `completions.jsonl` (completion, ground truth, reward), so a run
can be debugged and its logged rewards checked against `compute_score`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellpuzzle_cli.device import bf16_supported
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress
from cellpuzzle_cli.rl.health import RewardHealth, reward_health
from cellpuzzle_cli.rl.settings import MODEL_KEY, TRAIN_KEY, RLSettings, saved_settings

# verl's actor.loss_agg_mode -> TRL's loss_type (same normalisation of the token losses).
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo",
              "seq-mean-token-sum-norm": "dr_grpo"}
ACTOR = "actor_rollout_ref.actor."
ROLLOUT = "actor_rollout_ref.rollout."


@dataclass
class TrlPlan:
    grpo_args: dict[str, Any]
    ignored_note: str
    model: str
    train_file: str


@dataclass
class TrlResult:
    output: Path
    steps: int
    rewards: list[float]
    dropped_prompts: int
    health: RewardHealth
    log_history: list[dict[str, Any]] = field(default_factory=list)
    curriculum: list[dict[str, Any]] | None = None  # per stage: sizes, steps, N mix, reward


def _num(settings: RLSettings, key: str, default: Any, kind: type = float) -> Any:
    value = settings.get(key, default)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"Config key '{key}' must be a number, got {value!r}.") from exc


def _first_file(value: Any, key: str) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise UserError(f"The TRL backend reads one Parquet file; '{key}' lists {len(value)}.")
        value = value[0]
    if not value:
        raise UserError(f"'{key}' is not set. Run `cellpuzzle to-parquet` first or pass --data.")
    return str(value)


def build_plan(settings: RLSettings, use_cpu: bool) -> TrlPlan:
    """GRPOConfig keyword arguments from verl's keys; divisibility checked here, not mid-run."""
    n = _num(settings, ROLLOUT + "n", 1, int)
    prompts = _num(settings, "data.train_batch_size", 1, int)
    mini = _num(settings, ACTOR + "ppo_mini_batch_size", prompts, int)
    micro = _num(settings, ACTOR + "ppo_micro_batch_size_per_gpu", 1, int)
    if n < 2:
        raise UserError(f"GRPO compares answers within a group: {ROLLOUT}n must be at least 2 "
                        f"(got {n}).")
    if (mini * n) % micro:
        raise UserError(f"{ACTOR}ppo_mini_batch_size x {ROLLOUT}n = {mini * n} samples must be a "
                        f"multiple of {ACTOR}ppo_micro_batch_size_per_gpu ({micro}).")
    if prompts % mini:
        raise UserError(f"data.train_batch_size ({prompts}) must be a multiple of "
                        f"{ACTOR}ppo_mini_batch_size ({mini}).")
    use_kl = bool(settings.get(ACTOR + "use_kl_loss", False))
    top_k = _num(settings, ROLLOUT + "top_k", -1, int)
    warmup = _num(settings, ACTOR + "optim.lr_warmup_steps_ratio", 0.0)
    loss_mode = settings.get(ACTOR + "loss_agg_mode", "token-mean")
    if loss_mode not in LOSS_TYPES:
        raise UserError(f"{ACTOR}loss_agg_mode '{loss_mode}' has no TRL equivalent; use one of "
                        f"{', '.join(LOSS_TYPES)}.")
    total_steps = settings.get("trainer.total_training_steps")
    args: dict[str, Any] = {
        "learning_rate": _num(settings, ACTOR + "optim.lr", 1e-6),
        "weight_decay": _num(settings, ACTOR + "optim.weight_decay", 0.0),
        "warmup_ratio": warmup or 0.0,
        "lr_scheduler_type": "constant_with_warmup" if warmup else "constant",
        "max_grad_norm": _num(settings, ACTOR + "grad_clip", 1.0),
        "num_generations": n,
        "generation_batch_size": prompts * n,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": mini * n // micro,
        "num_iterations": _num(settings, ACTOR + "ppo_epochs", 1, int),
        "beta": _num(settings, ACTOR + "kl_loss_coef", 0.001) if use_kl else 0.0,
        "epsilon": _num(settings, ACTOR + "clip_ratio", 0.2),
        "loss_type": LOSS_TYPES[loss_mode],
        "scale_rewards": "group" if settings.get("algorithm.norm_adv_by_std_in_grpo", True)
        else "none",
        "max_completion_length": _num(settings, "data.max_response_length", 512, int),
        "temperature": _num(settings, ROLLOUT + "temperature", 1.0),
        "top_p": _num(settings, ROLLOUT + "top_p", 1.0),
        "top_k": 0 if top_k is None or top_k < 0 else top_k,
        "num_train_epochs": _num(settings, "trainer.total_epochs", 1),
        "max_steps": int(total_steps) if total_steps else -1,
        "gradient_checkpointing": bool(settings.get(
            "actor_rollout_ref.model.enable_gradient_checkpointing", False)),
        "seed": settings.ours.seed,
        "data_seed": settings.ours.seed,
        "logging_steps": settings.ours.logging_steps,
        "use_cpu": use_cpu,
        "bf16": not use_cpu and bf16_supported(),
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }
    note = ("Keys about Ray, FSDP, vLLM, offloading, critics and GPUs only apply to --backend "
            "verl.")
    if settings.get("algorithm.use_kl_in_reward", False):
        raise UserError("algorithm.use_kl_in_reward has no TRL equivalent; the TRL backend puts "
                        f"the KL term in the loss ({ACTOR}use_kl_loss, kl_loss_coef).")
    return TrlPlan(grpo_args=args, ignored_note=note,
                   model=str(settings.get(MODEL_KEY) or ""),
                   train_file=_first_file(settings.get(TRAIN_KEY), TRAIN_KEY))


def load_rows(path: Path) -> list[dict[str, Any]]:
    """`prompt` chat turns, `ground_truth` and `candidates` (open-set puzzles, else None; TRL
    hands the column to the reward) from a to-parquet (verl RL schema) file."""
    from cellpuzzle_cli.io import read_records

    rows = []
    for i, rec in enumerate(read_records(Path(path))):
        gt = (rec.get("reward_model") or {}).get("ground_truth")
        if not isinstance(rec.get("prompt"), list) or gt is None:
            raise UserError(f"{path} row {i} lacks a chat 'prompt' or reward_model.ground_truth; "
                            "it is not a to-parquet (verl RL schema) file. Re-run "
                            "`cellpuzzle to-parquet`.")
        candidates = (rec.get("extra_info") or {}).get("candidates")   # open-set puzzles only
        rows.append({"prompt": [{"role": t["role"], "content": t["content"]} for t in rec["prompt"]],
                     "ground_truth": gt, "data_source": rec.get("data_source") or "cellpuzzle",
                     "candidates": None if candidates is None else [str(c) for c in candidates]})
    if not rows:
        raise UserError(f"{path} holds no rows to train on.")
    return rows


def _drop_long(rows: list[dict[str, Any]], tokenizer: Any, max_len: int | None) -> tuple[list, int]:
    if not max_len:
        return rows, 0
    kept = [r for r in rows if len(tokenizer.apply_chat_template(
        r["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        <= max_len]
    return kept, len(rows) - len(kept)


class _RewardRecorder:
    """Wraps our TRL reward: same values, and each call's completions kept for the log file."""

    def __init__(self, reward_fn: Callable[..., list[float]],
                 observe: Callable[[list[float]], None] | None = None):
        self.reward_fn, self.observe = reward_fn, observe  # observe: a curriculum's stage test
        self.records: list[dict[str, Any]] = []
        self.calls = 0
        self.__name__ = reward_fn.__name__

    def __call__(self, completions: list[Any], ground_truth: list[Any], **kwargs: Any) -> list[float]:
        from cellpuzzle_cli.reward import completion_text

        rewards = self.reward_fn(completions, ground_truth=ground_truth, **kwargs)
        for c, g, r in zip(completions, ground_truth, rewards):
            self.records.append({"call": self.calls, "completion": completion_text(c),
                                 "ground_truth": g, "reward": r})
        self.calls += 1
        if self.observe is not None:
            self.observe(list(rewards))
        return rewards


def run_grpo(settings: RLSettings, tplan: TrlPlan, output: Path, overwrite: bool = False,
             progress: Progress | None = None) -> TrlResult:
    """Train with TRL's GRPOTrainer; the final model appears in `output` atomically."""
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from cellpuzzle_cli.config import save_settings
    from cellpuzzle_cli.curves import finite_guard, write_curves
    from cellpuzzle_cli.io import atomic_output_dir, write_jsonl
    from cellpuzzle_cli.reward import make_trl_reward

    model_dir = Path(tplan.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"The model '{model_dir}' is not a Hugging Face model folder (no "
                        "config.json). Pass --model, or run merge-lora / init-model first.")
    set_seed(settings.ours.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows, dropped = _drop_long(load_rows(Path(tplan.train_file)), tokenizer,
                               settings.get("data.max_prompt_length"))
    if not rows:
        raise UserError(f"Every prompt is longer than data.max_prompt_length "
                        f"({settings.get('data.max_prompt_length')} tokens). Raise it.")
    trainer_class, grpo_args, state = _with_curriculum(settings, tplan, rows, GRPOTrainer)
    recorder = _RewardRecorder(make_trl_reward(), state.observe if state else None)

    class _Report(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if progress:
                progress(state.global_step, total=state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if progress and logs and "reward" in logs:
                progress(0, description=f"GRPO step {state.global_step} reward "
                                        f"{logs['reward']:.3f}")

        def on_step_end(self, args, state, control, **kwargs):
            if progress:
                progress(1)

    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        args = GRPOConfig(output_dir=str(tmp / "trainer"), **grpo_args)
        trainer = trainer_class(model=str(model_dir), reward_funcs=[recorder], args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              callbacks=[_Report(), finite_guard("rl grpo (TRL)")])
        trainer.remove_callback(PrinterCallback)  # progress and metrics.jsonl report instead
        trainer.train()
        health = reward_health(recorder.records, tplan.grpo_args["num_generations"])
        _refuse_no_op(health, settings.ours.fail_on_flat_reward)
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; rl-grpo.yaml has it all
        history = list(trainer.state.log_history)
        extra = _per_step(history, health)
        if state is not None:
            for step, values in state.step_extras([int(h["step"]) for h in history]).items():
                extra.setdefault(step, {}).update(values)
        write_curves(tmp, history, f"rl {settings.algorithm} (TRL)", extra=extra)
        write_jsonl(tmp / "completions.jsonl", recorder.records)
        save_settings(tmp, f"rl {settings.algorithm}", saved_settings(settings))
    rewards = [h["reward"] for h in history if "reward" in h]
    return TrlResult(output=Path(output), steps=trainer.state.global_step, rewards=rewards,
                     dropped_prompts=dropped, health=health, log_history=history,
                     curriculum=state.summary() if state else None)


def _with_curriculum(settings: RLSettings, tplan: TrlPlan, rows: list[dict[str, Any]],
                     base: type) -> tuple[type, dict[str, Any], Any]:
    """The trainer class, GRPOConfig arguments and stage state of a curriculum run (the plain
    trainer and arguments without one). The run's length is then fixed: the sampler draws it."""
    from cellpuzzle_cli.rl.curriculum import plan_total, staged_grpo, trl_state

    args = dict(tplan.grpo_args)
    if settings.ours.curriculum is None:
        return base, args, None
    per_round = args["generation_batch_size"] // (
        args["per_device_train_batch_size"] * args["gradient_accumulation_steps"])
    spr = per_round * args["num_iterations"]
    total = args["max_steps"] if args["max_steps"] > 0 else plan_total(settings, len(rows)) * spr
    state = trl_state(settings, rows, tplan.train_file, spr, total)
    args["max_steps"] = total
    return staged_grpo(base, state, total // spr + 2), args, state


def _refuse_no_op(health: RewardHealth, fail_on_flat: bool) -> None:
    """A run whose reward never ran is broken; a flat one only with `fail_on_flat_reward`."""
    if health.never_called or (fail_on_flat and health.all_flat):
        raise UserError(f"{health.warning()} Nothing was written"
                        + (" (cellpuzzle.fail_on_flat_reward / --fail-on-flat-reward)."
                           if fail_on_flat and not health.never_called else "."))


def _per_step(history: list[dict[str, Any]], health: RewardHealth) -> dict[int, dict[str, Any]]:
    """The share of legitimate answers of each reward round, on the step TRL logged it at."""
    steps = [int(h["step"]) for h in history if "reward" in h]
    if len(steps) != len(health.legitimate):  # rounds and logged steps do not pair up
        return {}
    return {step: {"legitimate_share": share} for step, share in zip(steps, health.legitimate)}

