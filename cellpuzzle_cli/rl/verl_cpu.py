"""A verl 0.9.1 plugin that lets verl's real trainer run on a CPU-only machine.

verl imports every module named in `VERL_USE_EXTERNAL_MODULES` from `verl/__init__.py`, in the
driver and in every Ray worker it starts. `rl --device cpu` names this module there (see
`verl_backend.cpu_environment`), so importing it is the whole installation:

- a `cpu` platform (selected with `VERL_PLATFORM=cpu`) that reports device "cpu", gloo and
  Ray "GPU" resources (the launcher starts Ray with that many fake GPUs, one per rank);
- three small patches to verl internals that assume an accelerator (each says why below);
- a rollout named `hf` that generates with transformers (`cellpuzzle_cli.rl.hf_rollout`),
  because vLLM and SGLang need a GPU.

Nothing here runs unless verl imports it: the module is never imported by cellpuzzle itself.
The patches are checked against verl 0.9.1 only; the launcher refuses other versions first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

PLATFORM = "cpu"
ROLLOUT = "hf"
HF_ROLLOUT_MODULE = "cellpuzzle_cli.rl.hf_rollout"


def _no_op(*_: Any, **__: Any) -> None:
    return None


def _zero(*_: Any, **__: Any) -> int:
    return 0


def _device_module() -> types.ModuleType:
    """`torch.cpu` plus the memory/RNG calls verl makes on `torch.cuda`, as no-ops on CPU.

    verl calls e.g. `get_torch_device().empty_cache()` or `.max_memory_allocated()` in the
    training loop; `torch.cpu` lacks them. A separate module keeps `torch.cpu` itself untouched.
    """
    module = types.ModuleType("cellpuzzle_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(module, name, getattr(torch.cpu, name))
    for name in ("empty_cache", "ipc_collect", "reset_peak_memory_stats",
                 "set_per_process_memory_fraction"):
        setattr(module, name, _no_op)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated",
                 "max_memory_reserved"):
        setattr(module, name, _zero)
    module.mem_get_info = lambda *_: (0, 0)
    module.get_device_name = lambda *_: "CPU"
    module.get_rng_state = lambda *_: torch.get_rng_state()
    module.set_rng_state = lambda state, *_: torch.set_rng_state(state)
    module.manual_seed = module.manual_seed_all = lambda seed: torch.manual_seed(seed)
    return module


@PlatformRegistry.register(platform=PLATFORM)
class CpuPlatform(PlatformBase):
    """verl's platform interface for a machine without accelerators.

    Ray still schedules verl's ranks as "GPU" bundles (one per rank), so the launcher starts
    Ray with fake GPUs; torch itself only ever sees the CPU.
    """

    _module = _device_module()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return True

    def current_device(self) -> Any:
        # verl passes this to `.to()` / `device_id=` / `torch.device()`: an int would mean cuda:N
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def _patch_process_group_backend() -> None:
    """Use plain `gloo` for verl's worker process groups.

    verl 0.9.1 builds the backend string `cpu:gloo,{device}:{backend}`, which on a CPU platform
    is `cpu:gloo,cpu:gloo`; torch rejects a device named twice. Only the default (None) is
    replaced: callers that pass their own backend keep it.
    """
    import verl.utils.distributed as dist_utils

    original = dist_utils.initialize_global_process_group_ray

    def initialize_global_process_group_ray(timeout_second: Any = None, backend: Any = None) -> Any:
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    dist_utils.initialize_global_process_group_ray = initialize_global_process_group_ray


def _patch_fsdp2_offload_policy() -> None:
    """Make FSDP2's CPU offload policy unpinned.

    verl 0.9.1's FSDP engine builds `CPUOffloadPolicy(pin_memory=True)` for reference models
    and offloaded actors/critics; pinning host memory needs an accelerator, so it fails on a
    CPU-only torch. The subclass keeps `isinstance` checks working and only drops the pinning.
    """
    from verl.utils import fsdp_utils

    base = fsdp_utils.CPUOffloadPolicy
    if base is None or getattr(base, "_cellpuzzle_unpinned", False):
        return

    @dataclasses.dataclass
    class UnpinnedCPUOffloadPolicy(base):  # type: ignore[misc, valid-type]
        _cellpuzzle_unpinned = True

        def __post_init__(self) -> None:
            self.pin_memory = False

    fsdp_utils.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


def _patch_value_model_attention() -> None:
    """Load PPO's critic with SDPA attention.

    verl 0.9.1's `load_valuehead_model` passes `attn_implementation="flash_attention_2"`
    explicitly (ignoring `critic.model.override_config`), and flash-attention needs CUDA. This
    loads the same first choice verl makes, a token-classification model (verl has already set
    `num_labels=1` on the config), with SDPA instead.
    """
    import verl.utils.model as model_utils

    def load_valuehead_model(local_path: str, torch_dtype: Any, model_config: Any,
                             trust_remote_code: bool) -> Any:
        from transformers import AutoModelForTokenClassification

        try:
            return AutoModelForTokenClassification.from_pretrained(
                local_path, torch_dtype=torch_dtype, config=model_config,
                attn_implementation="sdpa", trust_remote_code=trust_remote_code)
        except ValueError as exc:
            raise ValueError(f"The CPU critic needs a model with a token-classification head "
                             f"(as Qwen2 and Llama have): {exc}") from exc

    model_utils.load_valuehead_model = load_valuehead_model


def _register_hf_rollout() -> None:
    """Register the transformers rollout under both of verl's rollout registries.

    The worker-side adapter (receives synced weights) goes in `_ROLLOUT_REGISTRY` by dotted
    path; the replica (launches the generation server) goes in `RolloutReplicaRegistry` with a
    loader, so transformers is only imported where a rollout is actually built.
    """
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    _ROLLOUT_REGISTRY[(ROLLOUT, "async")] = f"{HF_ROLLOUT_MODULE}.HFServerAdapter"

    def load_replica() -> type:
        import importlib

        return importlib.import_module(HF_ROLLOUT_MODULE).HFReplica

    RolloutReplicaRegistry.register(ROLLOUT, load_replica)


def install() -> None:
    """Apply the patches and register the rollout (the platform registers on import)."""
    _patch_process_group_backend()
    _patch_fsdp2_offload_policy()
    _patch_value_model_attention()
    _register_hf_rollout()


install()
