"""Checks that stop a verl run in seconds, before Ray starts, instead of minutes into it.

verl validates some settings when it composes its config (`verl_backend.validate`), but asserts
others only on the workers: the rollout's parallel size against the ranks, the mini/micro
batch split per rank, the micro batches of the log-prob passes. It also truncates over-long
prompts from the left without a word. Each check here mirrors one such place in verl 0.9.1
(named in its docstring), so it refuses exactly what verl would refuse or silently mangle,
and names the key and the fix.

The reward canary is the one check that needs the run itself: verl ignores reward keys it does
not read, so we watch that our `compute_score` was called by the time the first step is logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError

REMOTE = ("hdfs://", "s3://", "gs://")
ACTOR = "actor_rollout_ref.actor"
ROLLOUT = "actor_rollout_ref.rollout"
REF = "actor_rollout_ref.ref"
MODEL = "actor_rollout_ref.model"
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.safetensors.index.json", "*.bin.index.json")


def is_local(value: Any) -> bool:
    return bool(value) and not str(value).startswith(REMOTE)


# -- the model folder ------------------------------------------------------------------------

def model_problem(path: Any, trust_remote_code: bool = False, load: bool = True) -> str | None:
    """Why `path` is not a usable Hugging Face model folder, or None when it is (or is remote).

    With `load`, its config and tokenizer are loaded too (seconds, even for a 7B model: the
    weights are only looked for, not read).
    """
    if not is_local(path):
        return None
    folder = Path(str(path)).expanduser()
    if not folder.exists():
        return f"'{folder}' does not exist"
    if not folder.is_dir():
        return f"'{folder}' is not a folder"
    if not (folder / "config.json").is_file():
        return f"'{folder}' has no config.json (an empty or partly copied model folder)"
    if not any(any(folder.glob(pattern)) for pattern in WEIGHTS):
        return f"'{folder}' has no weight files (*.safetensors or *.bin)"
    if load:
        try:
            from transformers import AutoConfig, AutoTokenizer

            AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError,
                RuntimeError) as exc:  # what transformers raises for a broken folder
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"'{folder}' cannot be loaded with transformers ({first})"
    return None


def _needs_critic(cfg: Any) -> bool:
    """verl's own rule; it warns when GRPO disables the critic, which is no news here."""
    import warnings

    from verl.trainer.ppo.utils import need_critic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(need_critic(cfg))


def model_keys(cfg: Any) -> list[str]:
    """The model folders verl will load: the actor's, and the critic's when there is one."""
    keys = [f"{MODEL}.path"]
    if _needs_critic(cfg):
        keys.append("critic.model.path")
    return keys


def check_models(cfg: Any) -> None:
    """A real run needs every model folder present and loadable (verl finds out on a worker)."""
    from omegaconf import OmegaConf

    for key in model_keys(cfg):
        section = OmegaConf.select(cfg, key.rsplit(".", 1)[0])
        problem = model_problem(OmegaConf.select(cfg, key),
                                bool(section.get("trust_remote_code", False)))
        if problem:
            raise UserError(f"{key}: {problem}. A verl run loads this model on every rank. "
                            "Point the key (or --model) at a Hugging Face model folder, e.g. "
                            "the output of `cellpuzzle merge-lora` or `init-model --tiny`.")


# -- batch arithmetic ------------------------------------------------------------------------

def _get(cfg: Any, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def _rollout_split(cfg: Any, n_gpus: int, per_node: int) -> Iterator[str]:
    """verl's `init_model` asserts ranks % (tp x dp x pp) == 0; its replica splits per node."""
    tp = int(_get(cfg, f"{ROLLOUT}.tensor_model_parallel_size", 1))
    size = tp * int(_get(cfg, f"{ROLLOUT}.data_parallel_size", 1)) * int(
        _get(cfg, f"{ROLLOUT}.pipeline_model_parallel_size", 1))
    if n_gpus % size:
        yield (f"A rollout replica takes {size} GPUs ({ROLLOUT}.tensor_model_parallel_size={tp} "
               "x data x pipeline parallel size), which does not divide the "
               f"{n_gpus} GPUs of trainer.nnodes x trainer.n_gpus_per_node. Use a tensor "
               "parallel size that divides the GPU count, or change the GPU count.")
    elif size > per_node and size % per_node:
        yield (f"A rollout replica of {size} GPUs ({ROLLOUT}.tensor_model_parallel_size) cannot be "
               f"split into nodes of trainer.n_gpus_per_node={per_node}. Use a replica size "
               "that is a multiple of the GPUs per node, or at most one node.")


def _train_split(role: str, mini_key: str, micro_key: str | None, cfg: Any, n: int, dp: int
                 ) -> Iterator[str]:
    """verl's `train_mini_batch` asserts (mini x n) % dp == 0, and `prepare_micro_batches` that
    each rank's share is a whole number of micro batches (when the engine uses fixed ones)."""
    mini = int(_get(cfg, mini_key, 0)) * n
    micro = _get(cfg, micro_key) if micro_key else None
    if mini % dp:
        yield (f"{mini_key} x rollout.n = {mini} samples per update cannot be split over {dp} "
               f"data-parallel {role} ranks. Make {mini_key} x {ROLLOUT}.n a multiple of {dp}.")
    elif micro and (mini // dp) % int(micro):
        yield (f"Each of the {dp} {role} ranks gets {mini // dp} samples per update "
               f"({mini_key} x {ROLLOUT}.n / ranks), which is not a multiple of {micro_key}="
               f"{micro}. Choose a micro batch that divides {mini // dp}.")


def _infer_split(what: str, micro_key: str, cfg: Any, samples: int, dp: int) -> Iterator[str]:
    """verl's `prepare_micro_batches` asserts each rank's forward share is whole micro batches."""
    micro = _get(cfg, micro_key)
    if micro and samples % dp == 0 and (samples // dp) % int(micro):
        yield (f"Each of the {dp} ranks computes {what} for {samples // dp} samples "
               f"(data.train_batch_size x {ROLLOUT}.n / ranks), which is not a multiple of "
               f"{micro_key}={micro}. Choose a micro batch that divides {samples // dp}.")


def batch_problems(cfg: Any) -> list[str]:
    """What verl 0.9.1 would assert about batch sizes on its workers, from the composed config."""
    from verl.trainer.ppo.utils import need_reference_policy

    per_node = int(_get(cfg, "trainer.n_gpus_per_node", 1))
    n_gpus = per_node * int(_get(cfg, "trainer.nnodes", 1))
    n = int(_get(cfg, f"{ROLLOUT}.n", 1))
    samples = int(_get(cfg, "data.train_batch_size", 0)) * n
    problems = list(_rollout_split(cfg, n_gpus, per_node))
    sp = int(_get(cfg, f"{ACTOR}.ulysses_sequence_parallel_size", 1))
    if n_gpus % sp:
        problems.append(f"{ACTOR}.ulysses_sequence_parallel_size={sp} does not divide the "
                        f"{n_gpus} GPUs of trainer.nnodes x trainer.n_gpus_per_node.")
        return problems
    dp = n_gpus // sp
    dynamic = bool(_get(cfg, f"{ACTOR}.use_dynamic_bsz", False))  # token-sized micro batches
    problems += _train_split("actor", f"{ACTOR}.ppo_mini_batch_size",
                             None if dynamic else f"{ACTOR}.ppo_micro_batch_size_per_gpu",
                             cfg, n, dp)
    if not dynamic:
        problems += _infer_split("the rollout's log-probs",
                                 f"{ROLLOUT}.log_prob_micro_batch_size_per_gpu", cfg, samples, dp)
    if need_reference_policy(cfg) and not _get(cfg, f"{REF}.log_prob_use_dynamic_bsz", False):
        problems += _infer_split("the reference log-probs",
                                 f"{REF}.log_prob_micro_batch_size_per_gpu", cfg, samples, dp)
    if _needs_critic(cfg):
        # verl 0.9.1 sizes the critic's micro batches by tokens (its engine config keeps
        # use_dynamic_bsz=True), so only the mini-batch split over the ranks is asserted
        critic_dp = n_gpus // max(int(_get(cfg, "critic.ulysses_sequence_parallel_size", 1)), 1)
        problems += _train_split("critic", "critic.ppo_mini_batch_size", None, cfg, n, critic_dp)
    return problems


def check_batches(cfg: Any) -> None:
    problems = batch_problems(cfg)
    if problems:
        raise UserError("verl would stop on these batch sizes after starting Ray (it checks them "
                        "on its workers): " + " ".join(problems))


# -- prompt lengths --------------------------------------------------------------------------

@dataclass
class PromptLengths:
    file: str
    total: int
    too_long: int
    longest: int


def _files(value: Any) -> list[str]:
    """verl's data.*_files: one path or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def config_tokenizer(cfg: Any) -> Any:
    from transformers import AutoTokenizer

    path = _get(cfg, f"{MODEL}.tokenizer_path") or _get(cfg, f"{MODEL}.path")
    tokenizer = AutoTokenizer.from_pretrained(
        str(Path(str(path)).expanduser()),
        trust_remote_code=bool(_get(cfg, f"{MODEL}.trust_remote_code", False)))
    template = _get(cfg, f"{MODEL}.custom_chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def prompt_lengths(cfg: Any, file: str, tokenizer: Any) -> list[int]:
    """Each row's prompt length as verl's dataset counts it: the chat template with the
    generation prompt, tokenized without extra special tokens
    (`RLHFDataset.maybe_filter_out_long_prompts`)."""
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf

    key = str(_get(cfg, "data.prompt_key", "prompt"))
    kwargs = OmegaConf.select(cfg, "data.apply_chat_template_kwargs", default=None)
    kwargs = OmegaConf.to_container(kwargs) if kwargs else {}
    table = pq.read_table(Path(file).expanduser(), columns=[key])
    texts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                           **kwargs)
             for messages in table.column(key).to_pylist()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [len(x) for x in ids]


def measure_prompts(cfg: Any, file: str, tokenizer: Any) -> PromptLengths:
    """How many prompts of `file` exceed data.max_prompt_length (see `prompt_lengths`)."""
    limit = int(_get(cfg, "data.max_prompt_length", 0))
    lengths = prompt_lengths(cfg, file, tokenizer)
    return PromptLengths(file=file, total=len(lengths),
                         too_long=sum(length > limit for length in lengths),
                         longest=max(lengths, default=0))


def check_prompts(cfg: Any) -> list[str]:
    """Refuse prompts verl would cut, or data its filter and batching would leave empty.

    verl 0.9.1's agent loop left-truncates a prompt longer than the limit (dropping the system
    prompt and the start of the question) with only a log line; `data.filter_overlong_prompts`
    drops such rows instead. Its train dataloader drops a last partial batch, and it asserts
    that neither dataloader is empty, after Ray has started.
    """
    limit = int(_get(cfg, "data.max_prompt_length", 0))
    filtered = bool(_get(cfg, "data.filter_overlong_prompts", False))
    files = [(f, "train") for f in _files(_get(cfg, "data.train_files"))]
    files += [(f, "val") for f in _files(_get(cfg, "data.val_files"))]
    files = [(f, split) for f, split in files if is_local(f) and Path(f).expanduser().is_file()]
    tokenizer_path = _get(cfg, f"{MODEL}.tokenizer_path") or _get(cfg, f"{MODEL}.path")
    if not files or not is_local(tokenizer_path):
        return []  # remote data or model: nothing to measure here
    tokenizer = config_tokenizer(cfg)
    notes: list[str] = []
    left = {"train": 0, "val": 0}
    cut = {"train": 0, "val": 0}
    for file, split in files:
        found = measure_prompts(cfg, file, tokenizer)
        left[split] += found.total - (found.too_long if filtered else 0)
        cut[split] += found.too_long if filtered else 0
        if not found.too_long:
            continue
        what = (f"{found.too_long} of {found.total} prompts in {file} are longer than "
                f"data.max_prompt_length={limit} tokens (the longest has {found.longest})")
        if not filtered:
            raise UserError(f"{what}; verl would cut them from the left, losing the system "
                            "prompt and the start of the question, without an error. Raise "
                            f"data.max_prompt_length to at least {found.longest}, set "
                            "data.filter_overlong_prompts=true to drop them, or make puzzles "
                            "with fewer cells.")
        notes.append(f"{what}; verl drops them (data.filter_overlong_prompts=true).")
    _check_enough(cfg, files, left, cut, limit)
    return notes


def _check_enough(cfg: Any, files: list[tuple[str, str]], left: dict[str, int],
                  cut: dict[str, int], limit: int) -> None:
    """verl needs one full training batch and one validation prompt (its dataloader asserts)."""
    batch = int(_get(cfg, "data.train_batch_size", 1))
    splits = {split for _, split in files}
    fit = f" that fit data.max_prompt_length={limit}" if cut["train"] else ""
    if "train" in splits and left["train"] < batch:
        raise UserError(f"The training data has only {left['train']} prompt(s){fit}, fewer than "
                        f"one batch (data.train_batch_size={batch}), so verl would stop with "
                        "'Train dataloader is empty!'. Lower data.train_batch_size"
                        f"{', raise data.max_prompt_length' if fit else ''} or use more puzzles.")
    if "val" in splits and left["val"] == 0:
        fit = f" that fit data.max_prompt_length={limit}" if cut["val"] else ""
        raise UserError(f"The validation data (data.val_files) has no prompts{fit}, so verl would "
                        "stop with 'Validation dataloader is empty!'. Point data.val_files (or "
                        "--val-data) at a file with puzzles, e.g. the training file, or run "
                        "to-parquet with a non-zero --val-size.")


# -- the reward canary -----------------------------------------------------------------------

REWARD_LOG_NAME = "reward_calls.jsonl"
METRICS_LOG_NAME = "verl_metrics.jsonl"
STEP_KEY = "critic/score/mean"  # logged by verl's trainer for every training step


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        return []


@dataclass
class RewardCanary:
    """Watches a verl run's first training step for calls to `cellpuzzle_cli.reward`.

    Our reward appends its first calls to `reward_log` (see `cellpuzzle_cli.reward`); verl's
    file logger writes each step's metrics to `metrics_log`. A step logged while the reward log
    is still empty means verl scored with something else.
    """

    output: Path
    grace_s: float = 10.0
    _step_seen_at: float | None = None

    @property
    def reward_log(self) -> Path:
        return self.output.resolve() / REWARD_LOG_NAME

    @property
    def metrics_log(self) -> Path:
        return self.output.resolve() / METRICS_LOG_NAME

    def env(self) -> dict[str, str]:
        """The variables our reward and verl's file logger read."""
        from cellpuzzle_cli.reward import REWARD_LOG_ENV

        return {REWARD_LOG_ENV: str(self.reward_log), "VERL_FILE_LOGGER_PATH": str(self.metrics_log)}

    def reset(self) -> None:
        for path in (self.reward_log, self.metrics_log):
            path.unlink(missing_ok=True)

    def calls(self) -> int:
        return len(_lines(self.reward_log))

    def steps(self) -> int:
        """Training steps verl has logged so far."""
        count = 0
        for line in _lines(self.metrics_log):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if STEP_KEY in (record.get("data") or {}):
                count += 1
        return count

    def _failure(self) -> str:
        return (f"verl logged a training step but never called cellpuzzle's reward (nothing in "
                f"{self.reward_log}): it scored with something else. Check "
                "reward.custom_reward_function.path (pkg://cellpuzzle_cli.reward), "
                "reward.custom_reward_function.name (compute_score) and "
                "reward.reward_manager.name in your config; verl 0.9.1 ignores reward keys it "
                "does not read. If the cluster's nodes do not share the output folder, set "
                "cellpuzzle.reward_canary=false.")

    def check(self, now: float) -> str | None:
        """During the run: a failure message once a step is logged with no reward call."""
        if self.calls() or not self.steps():
            return None
        if self._step_seen_at is None:  # give a shared file system time to show the calls
            self._step_seen_at = now
            return None
        return self._failure() if now - self._step_seen_at >= self.grace_s else None

    def final(self, exit_code: int) -> str | None:
        """After the run: a successful run that trained must have called the reward."""
        if exit_code == 0 and self.steps() and not self.calls():
            return self._failure()
        return None
