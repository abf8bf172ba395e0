"""Several processes for one command: which process this is, and launching them.

`cellpuzzle sft --nproc-per-node N` starts N copies of itself under torchrun (DDP: gloo on CPU,
NCCL on GPUs, as accelerate picks); the Trainer then trains on every process and only the main
one (global rank 0) writes the output, the logs and the manifest entry. torchrun sets `RANK`
and `WORLD_SIZE`, so a command started by hand under torchrun behaves the same.
"""

from __future__ import annotations

import os
import subprocess
import sys

NPROC_FLAG = "--nproc-per-node"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in a single process, and in the process of global rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without `--nproc-per-node N` (the children must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == NPROC_FLAG:
            skip = True
        elif not arg.startswith(NPROC_FLAG + "="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `cellpuzzle ARGV` as `nproc` processes on this machine; returns torchrun's exit code.

    The argument list goes to torchrun as a list (no shell), unchanged but for the flag.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "cellpuzzle_cli", *strip_nproc(argv)]
    return subprocess.run(command, check=False).returncode
