"""verl FSDP actor checkpoints -> Hugging Face safetensors folders (`convert-ckpt`).

verl saves one `model_world_size_W_rank_R.pt` per rank, each holding that rank's DTensor
shards, plus `fsdp_config.json` and a `huggingface/` folder with config and tokenizer. We
reassemble each tensor from its DTensor placements, so any world size and mesh layout that
only shards or replicates works. Shards are loaded with `weights_only=True`: a checkpoint is a
pickle from elsewhere and must not be able to run code here.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpuzzle_cli.config import check_settings
from cellpuzzle_cli.device import Dtype, dtype_name
from cellpuzzle_cli.errors import UserError, existing_path, unsafe_pickle_message
from cellpuzzle_cli.io import Progress
from cellpuzzle_cli.manifest import Artifact

if TYPE_CHECKING:
    from cellpuzzle_cli.runner import Job

SHARD_RE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
STEP_RE = re.compile(r"^global_step_(\d+)$")
WEIGHTS_NAME = "model.safetensors"



@dataclass
class ConvertResult:
    output: Path
    actor_dir: Path
    world_size: int
    n_tensors: int
    n_parameters: int
    dtypes: list[str]
    dropped_tied: list[str]

    def summary(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "dropped_tied": self.dropped_tied}


# -- locating the actor folder ---------------------------------------------------------------

def _shard_files(folder: Path) -> dict[int, dict[int, Path]]:
    """{world_size: {rank: path}} of the model shard files directly in `folder`."""
    found: dict[int, dict[int, Path]] = {}
    for f in folder.iterdir() if folder.is_dir() else []:
        m = SHARD_RE.match(f.name)
        if m:
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    return found


def _latest_step(root: Path) -> Path | None:
    """The newest `global_step_N` under a checkpoint root (verl's tracker file first)."""
    tracker = root / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        step = tracker.read_text().strip()
        if step.isdigit() and (root / f"global_step_{step}").is_dir():
            return root / f"global_step_{step}"
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir()
             and (m := STEP_RE.match(p.name))]
    return max(steps)[1] if steps else None


def find_actor_dir(path: Path) -> Path:
    """Accept the actor folder, a `global_step_N` folder, or a checkpoint root (latest step)."""
    path = existing_path(path, "checkpoint")
    candidates = [path, path / "actor"]
    step = _latest_step(path) if path.is_dir() else None
    if step is not None:
        candidates += [step / "actor", step]
    for c in candidates:
        if _shard_files(c) or (c / "fsdp_config.json").is_file():
            return c
    raise UserError(
        f"'{path}' is not a verl FSDP checkpoint: found no model_world_size_W_rank_R.pt files or "
        "fsdp_config.json in it, in its actor/ folder, or in a global_step_N/actor folder. Pass "
        "the checkpoint root (trainer.default_local_dir), a global_step_N folder or its actor folder.")


def read_world_size(actor_dir: Path) -> tuple[int, list[Path]]:
    """World size from the shard file names, checked against fsdp_config.json; all ranks present."""
    shards = _shard_files(actor_dir)
    declared = None
    cfg_path = actor_dir / "fsdp_config.json"
    if cfg_path.is_file():
        try:
            declared = int(json.loads(cfg_path.read_text())["world_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{cfg_path} is not a verl fsdp_config.json (no integer world_size: "
                            f"{exc}). Restore it from the training run.") from exc
    if not shards:
        raise UserError(f"{actor_dir} has fsdp_config.json but no model_world_size_*_rank_*.pt "
                        "shard files. Was the checkpoint saved without 'model' in "
                        "checkpoint.save_contents, or only partly copied?")
    if len(shards) > 1:
        raise UserError(f"{actor_dir} mixes shard files of world sizes {sorted(shards)}. Keep only "
                        "the files of one run in the folder.")
    world_size, ranks = next(iter(shards.items()))
    if declared is not None and declared != world_size:
        raise UserError(f"The shard files in {actor_dir} are for world size {world_size} but "
                        f"fsdp_config.json says {declared}. The folder mixes two runs; copy the "
                        "complete checkpoint again.")
    missing = [r for r in range(world_size) if r not in ranks]
    if missing:
        names = ", ".join(f"model_world_size_{world_size}_rank_{r}.pt" for r in missing)
        raise UserError(f"The checkpoint {actor_dir} is incomplete: missing {names}. Copy every "
                        "rank's shard file (one per GPU of the training run).")
    return world_size, [ranks[r] for r in range(world_size)]


# -- loading and merging ---------------------------------------------------------------------

def _safe_classes() -> list[Any]:
    """The classes a DTensor pickle references; nothing else may be unpickled."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    classes: list[Any] = [DTensor, DeviceMesh, Shard, Replicate, DTensorSpec, TensorMeta]
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
        classes.append(_StridedShard)
    except ImportError:
        pass
    return classes


def load_shard(path: Path) -> dict[str, Any]:
    import torch

    # Unpickling a DeviceMesh without a process group warns about torch.compile; irrelevant here.
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)
    try:
        with torch.serialization.safe_globals(_safe_classes()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(unsafe_pickle_message(path)) from exc
    except Exception as exc:
        raise UserError(f"{path} could not be loaded as a checkpoint shard "
                        f"({type(exc).__name__}). It may be truncated or not a torch file; copy "
                        "it again.") from exc
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    odd = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise UserError(f"{path} holds entries that are not tensors ({', '.join(odd[:5])}), so it "
                        "is not an FSDP model shard. Point convert-ckpt at the actor folder of a "
                        "verl checkpoint (model_world_size_*_rank_*.pt).")
    return state


def _mesh_coords(mesh: Any, rank: int) -> tuple[int, ...]:
    import torch

    grid = mesh.mesh if isinstance(mesh.mesh, torch.Tensor) else torch.as_tensor(mesh.mesh)
    where = (grid == rank).nonzero()
    if where.numel() == 0:
        raise UserError(f"Rank {rank} is not in the checkpoint's device mesh {grid.tolist()}.")
    return tuple(int(i) for i in where[0])


def _assemble(key: str, pieces: dict[tuple[int, ...], Any], placements: tuple[Any, ...],
              mesh_shape: tuple[int, ...], depth: int = 0, prefix: tuple[int, ...] = ()) -> Any:
    """Rebuild one tensor: mesh dim `depth` either replicates (take index 0) or shards (concat)."""
    import torch
    from torch.distributed.tensor import Replicate, Shard

    if depth == len(mesh_shape):
        return pieces[prefix]
    placement = placements[depth]
    if isinstance(placement, Replicate):
        return _assemble(key, pieces, placements, mesh_shape, depth + 1, prefix + (0,))
    if type(placement) is Shard:
        parts = [_assemble(key, pieces, placements, mesh_shape, depth + 1, prefix + (i,))
                 for i in range(mesh_shape[depth])]
        return torch.cat(parts, dim=placement.dim)
    raise UserError(f"Tensor '{key}' uses the placement {placement}, which convert-ckpt cannot "
                    "reassemble (only Shard and Replicate). Use verl's own model merger for "
                    "this layout.")


def merge_shards(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Full tensors from every rank's state dict, in the key order of rank 0."""
    from torch.distributed.tensor import DTensor

    merged: dict[str, Any] = {}
    for key, first in states[0].items():
        if not isinstance(first, DTensor):
            merged[key] = first.detach().clone() if hasattr(first, "detach") else first
            continue
        mesh = first.device_mesh
        mesh_shape = tuple(mesh.mesh.shape)
        pieces = {}
        for rank, state in enumerate(states):
            if key not in state:
                raise UserError(f"Rank {rank}'s shard file lacks '{key}', which rank 0 has. The "
                                "shard files come from different runs; copy them again.")
            pieces[_mesh_coords(mesh, rank)] = state[key].to_local()
        full = _assemble(key, pieces, tuple(first.placements), mesh_shape)
        if tuple(full.shape) != tuple(first.shape):
            raise UserError(f"Reassembled '{key}' has shape {tuple(full.shape)} but the checkpoint "
                            f"declares {tuple(first.shape)}. A shard file is damaged.")
        merged[key] = full.contiguous()
    return merged


def _tied_duplicates(state: dict[str, Any], hf_dir: Path) -> list[str]:
    """Keys that the model config ties to another key (e.g. lm_head -> embed_tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, ImportError, AttributeError, TypeError):
        return []  # an architecture transformers cannot build offline: keep every key
    first_name: dict[int, str] = {}
    dropped = []
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first_name.setdefault(id(param), name)
        if owner != name and name in state and owner in state:
            if not torch.equal(state[name], state[owner]):
                raise UserError(f"The config ties '{name}' to '{owner}', but the checkpoint holds "
                                "different values for them. The huggingface/ config does not "
                                "belong to these weights.")
            dropped.append(name)
    return dropped


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    """Keep config.json's declared dtype in step with a cast."""
    from cellpuzzle_cli.io import write_json

    config = json.loads(config_path.read_text())
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    write_json(config_path, config)


@dataclass
class ConvertCkptSettings:
    """Saved as convert-ckpt.yaml beside the converted model."""

    dtype: Dtype = "auto"  # auto: keep the dtype the shards hold (verl's own merger casts to bf16)

    def __post_init__(self) -> None:
        self.dtype = dtype_name(self.dtype)


def convert_checkpoint(checkpoint: Path, output: Path, dtype: str = "auto", overwrite: bool = False,
                       progress: Progress | None = None) -> ConvertResult:
    """Write `output` (config, tokenizer, model.safetensors) from a verl FSDP actor checkpoint."""
    import torch
    from safetensors.torch import save_file

    dtype = check_settings(ConvertCkptSettings(dtype)).dtype
    cast = None if dtype == "auto" else dtype
    actor = find_actor_dir(Path(checkpoint))
    world_size, files = read_world_size(actor)
    hf_dir = actor / "huggingface"
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{actor} has no huggingface/config.json, so the model architecture is "
                        "unknown. verl writes it on every save; copy it with the shards.")
    states = []
    if progress:
        progress(0, total=world_size + 1)
    for f in files:
        states.append(load_shard(f))
        if progress:
            progress(1, description=f"loading {f.name}")
    merged = merge_shards(states)
    del states
    if cast is not None:
        target = getattr(torch, cast)
        merged = {k: v.to(target) if v.is_floating_point() else v for k, v in merged.items()}
    dropped = _tied_duplicates(merged, hf_dir)
    for key in dropped:
        del merged[key]
    from cellpuzzle_cli.io import atomic_output_dir

    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        for item in hf_dir.iterdir():
            if item.is_file() and not re.search(r"\.(safetensors|bin)(\.index\.json)?$", item.name):
                shutil.copy2(item, tmp / item.name)
        if cast is not None:
            _set_config_dtype(tmp / "config.json", cast)
        save_file(merged, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        from cellpuzzle_cli.config import save_settings

        save_settings(tmp, "convert-ckpt", ConvertCkptSettings(dtype))
    if progress:
        progress(1, description="written")
    return ConvertResult(
        output=Path(output), actor_dir=actor, world_size=world_size, n_tensors=len(merged),
        n_parameters=sum(v.numel() for v in merged.values()),
        dtypes=sorted({str(v.dtype).removeprefix("torch.") for v in merged.values()}),
        dropped_tied=dropped)


def plan(job: Job) -> None:
    """The run reads the actor folder of the checkpoint given (the latest step of a root)."""
    actor = find_actor_dir(Path(job.inputs["checkpoint"]))
    job.artifacts = [Artifact(actor, "checkpoint")]
    job.params = {"checkpoint": job.inputs["checkpoint"], "dtype": job.settings.dtype}


def step(job: Job, progress: Progress) -> ConvertResult:
    """convert-ckpt as a pipeline step (see `runner`)."""
    return convert_checkpoint(job.inputs["checkpoint"], job.output, dtype=job.settings.dtype,
                              overwrite=job.overwrite, progress=progress)
