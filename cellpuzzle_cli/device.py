"""Devices and dtypes: one vocabulary and one bf16 check for every step that runs a model.

sft, rl, predict, merge-lora and convert-ckpt all say `auto`, `bfloat16`, `float16` or
`float32` (the older spellings `bf16`, `fp16`, `fp32` and convert-ckpt's `keep` still read),
and all ask `bf16_supported()` before training or loading in bf16: bf16 only where the GPU
does it natively (Ampere and newer), float16 on older GPUs, float32 on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from cellpuzzle_cli.config import one_of
from cellpuzzle_cli.errors import UserError

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "bfloat16", "float16", "float32")
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "keep": "auto"}
# `auto`: what the device does best (converting a checkpoint: keep its dtype). The older
# spellings pass the check; settings classes turn them into these names (`dtype_name`).
Dtype = Annotated[str, one_of(*DTYPES, *_ALIASES)]


def dtype_name(value: Any) -> Any:
    """`bf16` -> `bfloat16` and the like; anything else unchanged (the settings check judges)."""
    return _ALIASES.get(value, value) if isinstance(value, str) else value


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16_supported() -> bool:
    """Whether this machine trains and runs models in bf16 natively."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_threads() -> None:
    """Torch's CPU threads as the user set them (OMP_NUM_THREADS), again: another library in
    the same process (scanpy's numba code, as annotate runs it before a model) may have reset
    OpenMP's count, and a tiny model on two threads of a busy machine runs many times slower."""
    import os

    import torch

    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0 and torch.get_num_threads() != int(wanted):
        torch.set_num_threads(int(wanted))


def pick_device(setting: str) -> str:
    """`auto` -> cuda when there is a GPU, else cpu; `cuda[:i]` only where there is one."""
    if setting == "auto":
        return "cuda" if cuda_available() else "cpu"
    if setting.startswith("cuda") and not cuda_available():
        raise UserError(f"device={setting} was asked for, but torch sees no CUDA GPU here. Use "
                        "device=cpu (or leave device=auto).")
    return setting


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The dtype to load a model in on `device`; `auto` picks by the device's abilities."""
    import torch

    name = dtype_name(name)
    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if bf16_supported() else torch.float16
    if name not in DTYPES:
        raise UserError(f"dtype={name} is not one of {', '.join(DTYPES)}.")
    return getattr(torch, name)


def use_bf16(setting: bool | None) -> bool:
    """Training in bf16: where supported unless set; asked for where unsupported, an error."""
    supported = bf16_supported()
    if setting and not supported:
        raise UserError("bf16=true needs a CUDA GPU with bf16 support, and none is available. "
                        "Leave bf16 unset (auto) or set bf16=false.")
    return supported if setting is None else setting
