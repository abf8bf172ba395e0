"""What `rl --device cpu` changes in a verl run: verl's config keys and the process environment.

The same job (our config, Parquet, reward) then runs on verl's real trainer on this machine's
CPU, for tests and a laptop smoke run before the cluster. The environment makes verl import
our plugin (`cellpuzzle_cli.rl.verl_cpu`) in every process; the keys fit verl to one CPU
machine. Two kinds of keys:

- required: without them verl cannot run on CPU at all (vLLM, flash-attention and CUDA
  collectives need a GPU). They replace whatever the config says, and a command-line override
  that asks for something else is refused.
- laptop sizes: one rank, one agent-loop and one reward worker. They replace the cluster sizes
  of the shipped configs, but a value the user gives (command line or own config file) wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.rl import settings as S

SUPPORTED_VERL = "0.9.1"
PLUGIN = "cellpuzzle_cli.rl.verl_cpu"
# verl's legacy trainer imports these at start; verl declares them only under its GPU extra
RUNTIME_MODULES = ("cachetools", "fastapi", "uvicorn")

GPUS_RAY_KEY = "+ray_kwargs.ray_init.num_gpus"
CPUS_RAY_KEY = "ray_kwargs.ray_init.num_cpus"
# verl asks Ray for 3 CPUs per rank (its placement bundles); leave room for its other actors
RAY_CPUS_PER_RANK, RAY_CPUS_SPARE = 3, 8


def required_keys(n_gpus: int) -> dict[str, Any]:
    """The keys a CPU run cannot do without, for `n_gpus` fake GPUs (= ranks)."""
    return {
        "trainer.device": "cpu",
        S.NNODES_KEY: 1,
        "trainer.use_v1": False,  # the v1 trainer needs TransferQueue
        "actor_rollout_ref.rollout.name": "hf",  # vLLM/SGLang need a GPU
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
        "actor_rollout_ref.actor.strategy": "fsdp2",  # FSDP1 wants an accelerator device
        "actor_rollout_ref.ref.strategy": "fsdp2",
        "critic.strategy": "fsdp2",
        GPUS_RAY_KEY: n_gpus,  # verl's placement groups ask Ray for one GPU per rank
    }


def laptop_defaults(n_gpus: int) -> dict[str, Any]:
    """Sizes for one small machine; verl's defaults start 8 workers of each kind."""
    return {
        CPUS_RAY_KEY: RAY_CPUS_PER_RANK * n_gpus + RAY_CPUS_SPARE,  # logical CPUs for Ray
        "actor_rollout_ref.rollout.agent.num_workers": 1,
        "reward.num_workers": 1,
        "data.dataloader_num_workers": 0,
        # verl's default attention is flash-attention 2 (CUDA only); the critic ignores this
        # key, so the plugin loads it with SDPA itself
        "+actor_rollout_ref.model.override_config.attn_implementation": "sdpa",
    }


def check_verl_version(version: str | None = None) -> None:
    """The plugin patches verl internals as 0.9.1 has them; refuse any other version.

    `version` defaults to the installed verl's.
    """
    if version is None:
        try:
            import verl
        except ImportError as exc:
            raise UserError("--device cpu runs verl's trainer, but verl is not installed. "
                            "Install it with `pip install 'cellpuzzle[verl]'`.") from exc
        version = str(getattr(verl, "__version__", "unknown"))
    if version != SUPPORTED_VERL:
        raise UserError(f"--device cpu supports verl {SUPPORTED_VERL} only (its CPU plugin "
                        f"patches that version's internals), but verl {version} is installed. "
                        f"Install verl=={SUPPORTED_VERL} (`pip install 'cellpuzzle[verl]'`) or "
                        "run on GPUs without --device cpu.")


def check_runtime_modules() -> None:
    """verl's legacy trainer imports these when it starts; say so before Ray does."""
    import importlib.util

    missing = [m for m in RUNTIME_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"verl's trainer needs {', '.join(missing)}, which this environment "
                        "lacks (verl 0.9.1 lists them only under its GPU extra). Install them "
                        "with `pip install 'cellpuzzle[verl]'`.")


def check_local(st: S.RLSettings) -> None:
    """A CPU run starts its own Ray: an existing cluster's workers would lack the plugin."""
    if st.ours.ray_address:
        raise UserError("--device cpu starts its own Ray on this machine; drop --ray-address "
                        "(and cellpuzzle.ray_address), or drop --device cpu to use the cluster.")


def _user_value(explicit: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    bare = S.bare_key(key)
    for k in (bare, "+" + bare, "++" + bare):
        if k in explicit:
            return True, explicit[k]
    return False, None


def apply_cpu_device(st: S.RLSettings, explicit: Mapping[str, Any], shipped: bool,
                     gpus_flag: int | None) -> list[str]:
    """Set the CPU keys on `st`; `explicit` are the command-line overrides. Returns notes."""
    check_local(st)
    given, n_gpus = _user_value(explicit, S.GPUS_KEY)
    if gpus_flag is not None:
        n_gpus = gpus_flag
    elif not given:
        n_gpus = st.get(S.GPUS_KEY) if not shipped and st.has(S.GPUS_KEY) else 1
    n_gpus = int(n_gpus)
    S.set_key(st, S.GPUS_KEY, n_gpus)
    replaced = []
    for key, value in required_keys(n_gpus).items():
        given, wanted = _user_value(explicit, key)
        if given and str(wanted).lower() != str(value).lower():
            raise UserError(f"--device cpu needs {S.bare_key(key)}={S.hydra_value(value)}, but "
                            f"the command line sets it to {wanted!r}. Drop that override, or "
                            "drop --device cpu to run on GPUs.")
        old = st.get(key)
        if old is not None and str(old).lower() != str(value).lower():
            replaced.append(f"{S.bare_key(key)}={S.hydra_value(old)}")
        S.set_key(st, key, value)
    for key, value in laptop_defaults(n_gpus).items():
        if shipped or not st.has(key):
            given, _ = _user_value(explicit, key)
            if not given:
                S.set_key(st, key, value)
    if replaced:
        return [(f"--device cpu replaced {', '.join(replaced)} (CPU-only runs need "
                 "the hf rollout, FSDP2 and the legacy trainer).")]
    return []


def _source_root() -> str | None:
    """The folder holding `cellpuzzle_cli` when it runs from a source checkout, else None."""
    root = Path(__file__).resolve().parents[2]
    if any(part in ("site-packages", "dist-packages") for part in root.parts):
        return None
    return str(root)


def environment(base: Mapping[str, str]) -> dict[str, str]:
    """`base` plus what makes every verl process (driver and Ray workers) load the plugin."""
    env = dict(base)
    modules = [m for m in env.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if PLUGIN not in modules:
        modules.append(PLUGIN)
    env["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules)
    env["VERL_PLATFORM"] = "cpu"
    # verl registers its FSDP engines for device cuda/npu only; this picks them while the
    # platform (and so every tensor) stays on the CPU
    env["VERL_ENGINE_DEVICE"] = "cuda"
    root = _source_root()
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root and root not in paths:  # Ray workers must import this checkout's plugin too
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env
