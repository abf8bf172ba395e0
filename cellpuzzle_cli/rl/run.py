"""`rl grpo|ppo`: one request, two engines (verl on Ray for clusters, TRL on one machine).

Both read the same config (verl's dotted keys plus a `cellpuzzle:` section, see settings) and
default their data, model and reward to the manifest and `cellpuzzle_cli.reward`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpuzzle_cli.config import parse_overrides
from cellpuzzle_cli.device import cuda_available
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.manifest import Kind
from cellpuzzle_cli.rl import settings as S
from cellpuzzle_cli.steps import from_ledger

if TYPE_CHECKING:
    from cellpuzzle_cli.manifest import Manifest, RunRecord
    from cellpuzzle_cli.rl.preflight import RewardCanary
    from cellpuzzle_cli.runner import Job

PLACEHOLDER = "MISSING-{what}"


@dataclass
class RLRequest:
    algorithm: str
    config_file: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    nnodes: int | None = None
    gpus_per_node: int | None = None
    train: Path | None = None
    val: Path | None = None
    model: Path | None = None
    output: Path | None = None
    overwrite: bool = False


@dataclass
class RLResult:
    algorithm: str
    backend: str
    dry_run: bool
    output: Path
    command: list[str] | None = None
    overrides: list[str] = field(default_factory=list)
    exit_code: int = 0
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, Path] = field(default_factory=dict)
    grpo_args: dict[str, Any] | None = None
    steps: int = 0
    rewards: list[float] = field(default_factory=list)
    reward_calls: int | None = None  # verl: calls of our reward logged by the canary
    warnings: list[str] = field(default_factory=list)  # e.g. no reward spread: nothing learnt
    summary: dict[str, Any] = field(default_factory=dict)
    record: RunRecord | None = None  # the manifest entry of a finished run
    curriculum: list[dict[str, Any]] | None = None  # the stages (planned, or as trained)

    @property
    def records(self) -> list[RunRecord]:
        return [self.record] if self.record is not None else []


def _apply_flags(req: RLRequest, st: S.RLSettings) -> None:
    if req.nnodes is not None:
        st.verl[S.NNODES_KEY] = req.nnodes
    if req.gpus_per_node is not None:
        st.verl[S.GPUS_KEY] = req.gpus_per_node


# What each input is in the manifest, and what it is called in messages.
_SOURCES = {"train": (Kind.RL_TRAIN, "training Parquet"), "val": (Kind.RL_VAL, "validation Parquet"),
            "model": (Kind.MODEL, "model")}


def _fill_inputs(req: RLRequest, st: S.RLSettings, manifest: Manifest,
                 notes: list[str]) -> dict[str, Path]:
    """Data and model from flags, else the config, else the manifest (placeholders in a dry run)."""
    used: dict[str, Path] = {}
    wanted = [("train", S.TRAIN_KEY, req.train), ("model", S.MODEL_KEY, req.model)]
    if st.ours.backend == "verl":
        wanted.insert(1, ("val", S.VAL_KEY, req.val))
    for what, key, given in wanted:
        if given is not None:
            st.verl[key] = str(Path(given).resolve())
        if st.has(key):
            continue
        kind, label = _SOURCES[what]
        try:
            resolved = from_ledger(manifest, None, kind, label)
            found = resolved.path
            notes.append(resolved.note(label))
        except UserError:
            if what == "val" and S.TRAIN_KEY in st.verl:
                st.verl[key] = st.verl[S.TRAIN_KEY]
                notes.append(f"No validation Parquet found; {key} uses the training file.")
                continue
            if not req.dry_run:
                raise
            found = None
        if found is None:
            st.verl[key] = PLACEHOLDER.format(what=what)
            notes.append(f"{key} is a placeholder: no {what} given or recorded in the manifest.")
        else:
            st.verl[key] = str(Path(found).resolve())
            used[what] = Path(found)
    if st.get("algorithm.adv_estimator", "gae") == "gae":  # verl runs a critic: same start
        S.set_default(st, S.CRITIC_MODEL_KEY, st.get(S.MODEL_KEY))
    return used


def _check_files(st: S.RLSettings, keys: list[str]) -> None:
    for key in keys:
        values = st.get(key)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value and not str(value).startswith(("hdfs://", "s3://", "gs://")) \
                    and not Path(str(value)).exists():
                raise UserError(f"{key} points to '{value}', which does not exist. Fix the path "
                                "or the manifest entry it came from.")


def step(job: Job, progress: Callable[..., None] | None = None) -> RLResult:
    """rl grpo|ppo as a pipeline step: the runner layered the settings (verl keys and ours)."""
    req = RLRequest(algorithm=job.command.split()[-1], config_file=job.config,
                    overrides=parse_overrides(job.overrides), dry_run=job.flag("dry_run", False),
                    nnodes=job.flag("nnodes"), gpus_per_node=job.flag("gpus_per_node"),
                    train=job.inputs.get("train"), val=job.inputs.get("val"),
                    model=job.inputs.get("model"), output=job.output, overwrite=job.overwrite)
    return run_rl(req, job.settings, job.ledger, progress)


def run_rl(req: RLRequest, st: S.RLSettings, manifest: Manifest,
           progress: Callable[..., None] | None = None) -> RLResult:
    """Dry-run (compose + validate) or train with the chosen backend."""
    _apply_flags(req, st)
    backend = st.ours.backend
    if req.algorithm == "ppo" and backend == "trl":
        raise UserError("TRL has no PPO trainer (TRL 1.x removed it), so `rl ppo` runs on verl "
                        "only. Drop --backend trl (and cellpuzzle.backend: trl) to use verl, or "
                        "run `cellpuzzle rl grpo --backend trl` on one machine.")
    if backend == "verl" and st.ours.device == "cpu":
        from cellpuzzle_cli.rl.cpu_mode import check_local

        check_local(st)
    if backend == "verl" and st.ours.ray_address:
        from cellpuzzle_cli.ray_cluster import check_ray_address

        check_ray_address(st.ours.ray_address, st.ours.ray_connect_timeout_s)
        st.verl[S.RAY_ADDRESS_KEY] = st.ours.ray_address
    output = Path(req.output or f"rl-{req.algorithm}")
    notes: list[str] = []
    inputs = _fill_inputs(req, st, manifest, notes)
    for key, value in S.REWARD_DEFAULTS.items():
        S.set_default(st, key, value)
    if backend == "verl":
        S.set_default(st, S.OUTPUT_KEY, str(output.resolve()))
        result = _run_verl(req, st, output, inputs, notes)
    else:
        result = _run_trl(req, st, output, inputs, notes, progress)
    if not req.dry_run and result.exit_code == 0:
        result.record = _record(req, st, result)
    return result


def _record(req: RLRequest, st: S.RLSettings, result: RLResult) -> RunRecord:
    """The finished run as a manifest entry: a model folder (TRL) or verl's checkpoints."""
    from cellpuzzle_cli.manifest import Artifact, RunRecord

    params = {"algorithm": req.algorithm, "backend": result.backend, "device": st.ours.device,
              "config": req.config_file, "overrides": result.overrides}
    name, kind = ("model", Kind.MODEL) if result.backend == "trl" else \
        ("checkpoints", Kind.CHECKPOINTS)
    extra = {"summary": result.summary} if result.summary else {}
    return RunRecord(params, [Artifact(p, n) for n, p in result.inputs.items()],
                     [Artifact(result.output, name, kind)], extra)


def _run_verl(req: RLRequest, st: S.RLSettings, output: Path, inputs: dict[str, Path],
              notes: list[str]) -> RLResult:
    from cellpuzzle_cli.rl import curriculum as rl_curriculum
    from cellpuzzle_cli.rl import preflight

    if st.ours.device == "cpu":
        from cellpuzzle_cli.rl import cpu_mode

        cpu_mode.check_verl_version()
        notes += cpu_mode.apply_cpu_device(st, req.overrides, shipped=req.config_file is None,
                                           gpus_flag=req.gpus_per_node)
    canary = preflight.RewardCanary(output) if st.ours.reward_canary else None
    if canary:
        _add_canary_keys(st, canary)
    vc = rl_curriculum.plan_verl(st, output, req.dry_run, notes)
    if vc is not None and not req.dry_run:  # the checks below read the file verl will read
        rl_curriculum.write_staged(vc)
    try:
        vplan = _checked_plan(req, st, notes)
    except UserError:
        if vc is not None and not req.dry_run:
            vc.staged.unlink(missing_ok=True)
        raise
    result = RLResult(req.algorithm, "verl", req.dry_run, output, command=vplan.command,
                      overrides=vplan.overrides, notes=notes, inputs=inputs,
                      curriculum=vc.summary() if vc else None)
    if not req.dry_run:
        result.exit_code = _launch(req, st, output, vplan, canary)
        result.reward_calls = canary.calls() if canary else None
        if vc is not None:
            result.curriculum = vc.summary(canary.metrics_log if canary else None)
            result.summary = {"curriculum": result.curriculum}
    return result


def _checked_plan(req: RLRequest, st: S.RLSettings, notes: list[str]) -> Any:
    """verl's config composed and validated, then our pre-flight checks; notes go to `notes`."""
    from cellpuzzle_cli.rl import preflight, verl_backend

    overrides = S.to_overrides(st.verl)
    cfg = verl_backend.compose_config(overrides)
    lenient = _model_leniency(req, st, cfg, notes)
    vplan = verl_backend.plan(overrides, check=True, lenient_models=lenient, cfg=cfg)
    notes += vplan.notes
    preflight.check_batches(cfg)
    if not req.dry_run:
        _check_files(st, [S.TRAIN_KEY, S.VAL_KEY])
        if st.ours.device != "cpu" and not st.ours.ray_address:
            _check_local_runtime(st)
    if not lenient:
        notes += _prompt_checks(cfg, req.dry_run)
    return vplan


def _launch(req: RLRequest, st: S.RLSettings, output: Path, vplan: Any,
            canary: RewardCanary | None) -> int:
    """Run verl in its own session, watched by the canary; returns verl's exit code."""
    from cellpuzzle_cli.config import save_settings
    from cellpuzzle_cli.rl import verl_backend

    cpu = st.ours.device == "cpu"
    if cpu:  # last: everything before is checkable without verl's trainer modules
        from cellpuzzle_cli.rl import cpu_mode

        cpu_mode.check_runtime_modules()
    _prepare_output(output, req.overwrite)
    save_settings(output, f"rl {req.algorithm}", S.saved_settings(st))
    env = dict(os.environ)
    if canary:
        canary.reset()
        env.update(canary.env())
    if cpu:
        env = cpu_mode.environment(env)
    code = verl_backend.run(vplan.command, env=env, watch=canary.check if canary else None,
                            timeout_s=st.ours.run_timeout_s)
    problem = canary.final(code) if canary else None
    if problem:
        raise UserError(problem)
    return code


def _prompt_checks(cfg: Any, dry_run: bool) -> list[str]:
    """The data checks; a dry run (often on sample data) reports what a real run would refuse."""
    from cellpuzzle_cli.rl import preflight

    try:
        return preflight.check_prompts(cfg)
    except UserError as exc:
        if not dry_run:
            raise
        return [f"A real run would stop here: {exc}"]


def _add_canary_keys(st: S.RLSettings, canary: RewardCanary) -> None:
    """verl's file logger on, and the canary's variables in every Ray worker, also on a cluster
    whose workers do not inherit this process's environment."""
    for name, value in canary.env().items():
        S.set_key(st, f"+ray_kwargs.ray_init.runtime_env.env_vars.{name}", value)
    loggers = st.get("trainer.logger", ["console"])
    loggers = [loggers] if isinstance(loggers, str) else list(loggers or [])
    if "file" not in loggers:
        S.set_key(st, "trainer.logger", [*loggers, "file"])


def _model_leniency(req: RLRequest, st: S.RLSettings, cfg: Any, notes: list[str]) -> bool:
    """A real run needs loadable model folders; a dry run checks without them, saying so."""
    from cellpuzzle_cli.rl import preflight

    if not req.dry_run:
        preflight.check_models(cfg)
        return False
    placeholder = any(str(v).startswith(PLACEHOLDER.format(what="")) for v in st.verl.values())
    if placeholder:
        return True
    from omegaconf import OmegaConf

    for key in preflight.model_keys(cfg):
        problem = preflight.model_problem(OmegaConf.select(cfg, key), load=False)
        if problem:
            notes.append(f"{key}: {problem}, so verl's model checks (PPO's critic loads the "
                         "model's tokenizer) and the prompt-length check were skipped. A real "
                         "run needs the model folder.")
            return True
    return False


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()):
        if not overwrite and not (output / "latest_checkpointed_iteration.txt").exists():
            raise UserError(f"The output folder '{output}' already holds files that are not a verl "
                            "checkpoint. Choose another -o, or pass --overwrite to replace it.")
        if overwrite:
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def _check_local_runtime(st: S.RLSettings) -> None:
    """With a local Ray, verl's workers import these here; missing ones fail after Ray starts."""
    import importlib.util

    needed = []
    if st.get("trainer.use_v1", True):
        needed.append(("transfer_queue", "TransferQueue (verl's v1 trainer)"))
    engine = st.get("actor_rollout_ref.rollout.name", "vllm")
    if engine in ("vllm", "sglang"):
        needed.append((engine, f"{engine} (actor_rollout_ref.rollout.name={engine})"))
    missing = [label for module, label in needed if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"This machine lacks {', '.join(missing)}, which a verl run needs. Install "
                        "cellpuzzle with its `gpu` extra, the GPU stack (see "
                        "docs/dependencies.md), pass --ray-address of a cluster that has it, or "
                        "train on one machine with --backend trl.")


def _run_trl(req: RLRequest, st: S.RLSettings, output: Path, inputs: dict[str, Path],
             notes: list[str], progress: Callable[..., None] | None) -> RLResult:
    from cellpuzzle_cli.rl import trl_backend

    try:  # verl is an optional extra; when present, its schema still catches misspelt keys
        from cellpuzzle_cli.rl import verl_backend

        verl_backend.config_dir()
        verl_backend.compose_config(S.to_overrides(st.verl))
    except UserError as exc:
        if "not installed" not in str(exc):
            raise
        notes.append("verl is not installed: config keys were not checked against its schema.")
    tplan = trl_backend.build_plan(st, use_cpu=st.ours.device == "cpu" or not cuda_available())
    result = RLResult(req.algorithm, "trl", req.dry_run, output, overrides=S.to_overrides(st.verl),
                      notes=notes + [tplan.ignored_note], inputs=inputs, grpo_args=tplan.grpo_args)
    if req.dry_run:
        if st.ours.curriculum is not None:
            from cellpuzzle_cli.curriculum import parse_plan

            result.curriculum = [{"stage": k, "plan": str(stage)} for k, stage in
                                 enumerate(parse_plan(st.ours.curriculum), 1)]
        return result
    _check_files(st, [S.TRAIN_KEY, S.MODEL_KEY])
    trained = trl_backend.run_grpo(st, tplan, output, overwrite=req.overwrite, progress=progress)
    result.steps, result.rewards = trained.steps, trained.rewards
    result.summary = {"steps": trained.steps, "reward_health": trained.health.summary()}
    if trained.curriculum:
        result.curriculum = result.summary["curriculum"] = trained.curriculum
    if warning := trained.health.warning():
        result.warnings.append(warning)
    if trained.dropped_prompts:
        result.notes.append(f"{trained.dropped_prompts} prompt(s) longer than "
                            "data.max_prompt_length were dropped.")
    return result
