"""convert-ckpt on real FSDP2 checkpoints (gloo, 1 and 2 ranks, tied and untied embeddings)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ckpt_fixtures import build_fsdp_checkpoints, save_untied_bf16_variant
from fixtures import assert_user_error, tiny_model_dir


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    tied = tiny_model_dir(root / "tied")
    untied = root / "untied"
    save_untied_bf16_variant(tied, untied)
    run2 = root / "run2"
    build_fsdp_checkpoints(2, [(tied, run2 / "global_step_2" / "actor"),
                               (untied, root / "untied_ckpt" / "actor")], root)
    (run2 / "global_step_1").mkdir()  # an older, empty step: the tracker file must win
    (run2 / "latest_checkpointed_iteration.txt").write_text("2")
    build_fsdp_checkpoints(1, [(tied, root / "run1" / "global_step_5" / "actor")], root)
    return {"tied": tied, "untied": untied, "run2": run2, "untied_actor": root / "untied_ckpt" / "actor",
            "run1_step": root / "run1" / "global_step_5"}


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_model(original: Path, converted: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(original)
    b = AutoModelForCausalLM.from_pretrained(converted)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_two_rank_tied_checkpoint_root_converts_exactly(ckpts, cli, tmp_path):
    import torch

    shard = torch.load(ckpts["run2"] / "global_step_2/actor/model_world_size_2_rank_1.pt",
                       weights_only=True)
    emb = shard["model.embed_tokens.weight"]
    assert emb.to_local().shape[0] < emb.shape[0]  # really sharded across the two ranks

    out = tmp_path / "hf"
    result = cli("convert-ckpt", ckpts["run2"], "-o", out)
    assert result.code == 0, result.output
    assert "2 rank(s)" in " ".join(result.output.split())
    _assert_same_model(ckpts["tied"], out)
    assert "lm_head.weight" not in _weights(out)  # tied copy stored once, as HF does
    assert (out / "tokenizer.json").is_file()
    entry = json.loads(cli.manifest.read_text())["entries"][-1]
    assert entry["command"] == "convert-ckpt" and entry["outputs"][0]["name"] == "model"


def test_two_rank_untied_bf16_keeps_dtype_and_lm_head(ckpts, cli, tmp_path):
    import torch

    out = tmp_path / "hf"
    assert cli("convert-ckpt", ckpts["untied_actor"], "-o", out).code == 0
    weights = _weights(out)
    assert weights["lm_head.weight"].dtype == torch.bfloat16
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    _assert_same_model(ckpts["untied"], out)


def test_one_rank_step_folder_and_bf16_cast(ckpts, cli, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    assert cli("convert-ckpt", ckpts["run1_step"], "-o", out, "--dtype", "bf16").code == 0
    original = load_file(str(ckpts["tied"] / "model.safetensors"))
    converted = _weights(out)
    for key, value in original.items():
        assert torch.equal(converted[key], value.to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _copy_actor(ckpts, tmp_path) -> Path:
    actor = tmp_path / "actor"
    shutil.copytree(ckpts["run2"] / "global_step_2" / "actor", actor)
    return actor


def test_missing_shard_is_named(ckpts, cli, tmp_path):
    actor = _copy_actor(ckpts, tmp_path)
    (actor / "model_world_size_2_rank_1.pt").unlink()
    assert_user_error(cli("convert-ckpt", actor, "-o", tmp_path / "o"), "missing",
                      "model_world_size_2_rank_1.pt")
    assert not (tmp_path / "o").exists()


def test_world_size_mismatch(ckpts, cli, tmp_path):
    actor = _copy_actor(ckpts, tmp_path)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    assert_user_error(cli("convert-ckpt", actor, "-o", tmp_path / "o"), "says 4")


def test_folder_that_is_no_checkpoint(cli, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    assert_user_error(cli("convert-ckpt", tmp_path / "notes", "-o", tmp_path / "o"),
                      "not a verl FSDP checkpoint")


def test_code_in_a_shard_pickle_is_refused(ckpts, cli, tmp_path):
    import torch

    actor = tmp_path / "actor"
    (actor / "huggingface").mkdir(parents=True)
    shutil.copy(ckpts["tied"] / "config.json", actor / "huggingface" / "config.json")
    torch.save({"x": Path("/etc/passwd")}, actor / "model_world_size_1_rank_0.pt")
    result = cli("convert-ckpt", actor, "-o", tmp_path / "o")
    assert_user_error(result, "loading it could run code", "refused", "safetensors")
    assert "weights_only=False" not in result.output and "weights_only` set" not in result.output
    assert not (tmp_path / "o").exists()
