"""Real verl-layout FSDP2 checkpoints, built on CPU with gloo and `fully_shard`.

Each spawned rank loads the same Hugging Face model, shards it with FSDP2, and saves its own
DTensor state dict as `model_world_size_W_rank_R.pt`; rank 0 writes `fsdp_config.json` and
`huggingface/` (config + tokenizer), as verl's FSDPCheckpointManager does.
"""

from __future__ import annotations

import json
from pathlib import Path


def _module_tree(model_dir: Path):
    """The model's parameters under their Hugging Face names, as a plain nn.Module tree.

    Building it from the safetensors file keeps transformers out of the spawned ranks (its
    import dominates their start-up); FSDP2 shards it exactly as it would the real class.
    Tied embeddings are one Parameter registered under both names, as in transformers.
    """
    import torch
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    if config.get("tie_word_embeddings") and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    root = torch.nn.Module()
    params: dict[int, torch.nn.Parameter] = {}
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        key = tensor.data_ptr()
        params.setdefault(key, torch.nn.Parameter(tensor.clone()))
        node.register_parameter(leaf, params[key])
    return root


def _rank_main(rank: int, world_size: int, store: str, jobs: list[tuple[str, str]]) -> None:
    import shutil

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        for model_dir, actor_dir in jobs:
            model = _module_tree(Path(model_dir))
            for layer in model.model.layers.children():
                fully_shard(layer)
            fully_shard(model)
            state = model.state_dict()
            actor = Path(actor_dir)
            if rank == 0:
                (actor / "huggingface").mkdir(parents=True, exist_ok=True)
            dist.barrier()
            torch.save(state, actor / f"model_world_size_{world_size}_rank_{rank}.pt")
            if rank == 0:
                for f in Path(model_dir).iterdir():
                    if f.suffix != ".safetensors":
                        shutil.copy(f, actor / "huggingface" / f.name)
                (actor / "fsdp_config.json").write_text(
                    json.dumps({"FSDP_version": 2, "world_size": world_size}, indent=4))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def build_fsdp_checkpoints(world_size: int, jobs: list[tuple[Path, Path]], workdir: Path) -> None:
    """Save each (model_dir -> actor_dir) as a `world_size`-rank FSDP2 checkpoint."""
    import torch.multiprocessing as mp

    store = workdir / f"store_{world_size}"
    store.unlink(missing_ok=True)
    args = (world_size, str(store), [(str(m), str(a)) for m, a in jobs])
    if world_size == 1:  # one rank needs no second process
        _rank_main(0, *args)
        return
    mp.spawn(_rank_main, args=args, nprocs=world_size, join=True)


def save_untied_bf16_variant(tied_dir: Path, out_dir: Path) -> None:
    """The tiny model with a separate lm_head, stored in bf16 (so dtype keeping is visible)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tied_dir)
    config = model.config
    config.tie_word_embeddings = False
    untied = type(model)(config)
    torch.manual_seed(1)
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(torch.randn_like(untied.lm_head.weight))
    untied.to(torch.bfloat16).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tied_dir).save_pretrained(out_dir)
