"""Merging a LoRA adapter into its base model, for serving and RL without PEFT.

The base model comes from `--base`, else the adapter's own `adapter_config.json`
(`base_model_name_or_path`, an absolute folder when `sft` made it), else the manifest's
record of the `sft` run that wrote the adapter. The merged folder holds safetensors weights,
the tokenizer the adapter was trained with and the base's generation config.

`sft finetune=full` writes a whole model instead of an adapter; there is nothing to merge, so
merge-lora copies that folder to the output unchanged, and a pipeline (the demo, RL, predict)
runs the same commands whichever way the model was fine-tuned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpuzzle_cli.device import Dtype, dtype_name, torch_dtype
from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.io import Progress, atomic_output_dir
from cellpuzzle_cli.manifest import Artifact

if TYPE_CHECKING:
    from cellpuzzle_cli.runner import Job

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class MergeLoraSettings:
    """merge-lora's one setting (recorded in the manifest; the model folder holds no more)."""

    dtype: Dtype = "auto"  # auto: the dtype the base model was saved in

    def __post_init__(self) -> None:
        self.dtype = dtype_name(self.dtype)



@dataclass
class MergeResult:
    out: Path
    adapter: Path
    base: str
    parameters: int
    dtype: str
    copied: bool = False  # a full fine-tune, copied as it is


def is_full_finetune(folder: Path) -> bool:
    """Whether `folder` is what `sft finetune=full` writes: a whole model, no adapter (its saved
    sft.yaml says so; any other model folder is not an sft output)."""
    from cellpuzzle_cli.config import load_yaml, settings_file

    folder = Path(folder)
    saved = folder / settings_file("sft")
    if not saved.is_file() or not (folder / "config.json").is_file():
        return False
    try:
        return load_yaml(saved).get("finetune") == "full"
    except UserError:
        return False


def copy_full_model(model: Path, out: Path, *, overwrite: bool = False,
                    progress: Progress | None = None) -> MergeResult:
    """The pass-through for a full fine-tune: the model folder copied to `out` as it is."""
    import math
    import shutil

    from safetensors import safe_open

    tick = progress or (lambda *a, **k: None)
    tick(0, total=1, description="copying")
    model = Path(model)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for item in sorted(model.iterdir()):
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
    params, dtype = 0, "float32"
    for weights in sorted(Path(out).glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                sl = f.get_slice(key)
                params += math.prod(sl.get_shape())
                dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
                    sl.get_dtype(), sl.get_dtype())
    tick(1)
    return MergeResult(out=Path(out), adapter=model, base=str(model.resolve()), parameters=params,
                       dtype=dtype, copied=True)


def check_adapter(adapter: Path) -> dict[str, Any]:
    """The adapter's PEFT config, or a message naming what the folder lacks."""
    adapter = existing_path(adapter, "adapter folder")
    cfg_path = adapter / ADAPTER_CONFIG
    if not adapter.is_dir() or not cfg_path.is_file():
        have = sorted(p.name for p in adapter.iterdir())[:12] if adapter.is_dir() else [adapter.name]
        raise UserError(f"'{adapter}' is not a LoRA adapter folder: it has no {ADAPTER_CONFIG} "
                        f"(it holds: {', '.join(have) or 'nothing'}). Pass the -o folder of "
                        "`cellpuzzle sft`.")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path} is not valid JSON ({exc}). Re-run `cellpuzzle sft`.") from exc


def resolve_base(adapter: Path, base: str | Path | None = None,
                 recorded: Path | None = None) -> str:
    """`--base`, else the adapter's recorded base folder if it exists, else the manifest's."""
    if base is not None:
        return str(Path(base).resolve()) if Path(base).exists() else str(base)
    named = check_adapter(adapter).get("base_model_name_or_path")
    if named and Path(named).exists():
        return str(Path(named).resolve())
    if recorded is not None and Path(recorded).exists():
        return str(Path(recorded).resolve())
    if named:
        return str(named)  # a hub id; loading it works only where it is cached
    raise UserError(f"Cannot tell which base model the adapter '{adapter}' belongs to: its "
                    f"{ADAPTER_CONFIG} names none and the manifest records none. Pass --base.")


def merge_adapter(adapter: Path, out: Path, base: str, *, dtype: str = "auto",
                  overwrite: bool = False, trust_remote_code: bool = False,
                  progress: Progress | None = None) -> MergeResult:
    """Load base + adapter, `merge_and_unload`, save weights, tokenizer and generation config."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    adapter = Path(adapter)
    check_adapter(adapter)
    tick = progress or (lambda *a, **k: None)
    tick(0, total=3, description="loading base")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype if dtype == "auto" else torch_dtype(dtype, "cpu"),
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load the base model '{base}' ({exc}). Pass its folder with "
                        "--base.") from exc
    tick(1, description="applying adapter")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else "")
        raise UserError(f"The adapter '{adapter}' does not fit the base model '{base}' "
                        f"({detail[:300]}). The base must be the model the adapter was trained "
                        "on; pass the right one with --base.") from exc
    merged = peft_model.merge_and_unload()
    tick(1, description="saving")
    tok_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source), trust_remote_code=trust_remote_code)
    try:
        generation = GenerationConfig.from_pretrained(base)
    except (OSError, ValueError):
        generation = merged.generation_config
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        merged.generation_config = generation
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    tick(1)
    params = sum(p.numel() for p in merged.parameters())
    return MergeResult(out=Path(out), adapter=adapter, base=base, parameters=params,
                       dtype=str(merged.dtype).removeprefix("torch."))


def plan(job: Job) -> None:
    """A full fine-tune is copied; an adapter is merged into `--base`, else the base named in
    its adapter_config.json, else the one the ledger recorded for its sft run."""
    adapter = Path(job.inputs["adapter"])
    job.flags["full_model"] = is_full_finetune(adapter)
    if job.flags["full_model"]:
        base = str(adapter.resolve())
    else:
        check_adapter(adapter)
        given = job.flag("base")
        recorded = job.ledger.base_model_of(adapter) if given is None else None
        base = resolve_base(adapter, given, recorded)
        if Path(base).exists():
            job.artifacts.append(Artifact(Path(base), "base_model"))
    job.flags["base"] = base
    job.params = {"adapter": adapter, "base": base, **job.params}


def step(job: Job, progress: Progress) -> MergeResult:
    """merge-lora as a pipeline step (see `runner`)."""
    adapter = Path(job.inputs["adapter"])
    if job.flags["full_model"]:
        return copy_full_model(adapter, job.output, overwrite=job.overwrite, progress=progress)
    return merge_adapter(adapter, job.output, job.flags["base"], dtype=job.settings.dtype,
                         overwrite=job.overwrite, trust_remote_code=job.flag("trust_remote_code",
                                                                             False),
                         progress=progress)
