"""merge-lora: merged logits equal the PEFT model's, idempotent re-runs, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from fixtures import (
    assert_says,
    assert_user_error,
    foreign_model_dir,
    make_records,
    tiny_model_dir,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records():
    return make_records(12, seed=2)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, records) -> dict[str, Path]:
    """Both kinds of base model an adapter is merged into: project-made and foreign."""
    root = tmp_path_factory.mktemp("bases")
    return {"tiny": tiny_model_dir(root / "tiny", records),
            "foreign": foreign_model_dir(root / "foreign", records)}


@pytest.fixture
def tiny(bases) -> Path:
    return bases["tiny"]


def make_adapter(base: Path, out: Path, seed: int = 0, modules_to_save: list[str] | None = None
                 ) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so merging visibly changes the model;
    with `modules_to_save`, those layers' trainable copies are perturbed too (as sft trains them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                     modules_to_save=modules_to_save, ensure_weight_tying=bool(modules_to_save),
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def logits(model, tok, text: str):
    import torch

    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("which,saved", [("tiny", None), ("foreign", None),
                                         ("tiny", ["embed_tokens"])])
def test_merged_logits_equal_peft_logits(which, saved, bases, cli, records, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = bases[which]
    adapter = make_adapter(base, tmp_path / "adapter", modules_to_save=saved)
    out = tmp_path / "merged"
    result = cli("merge-lora", adapter, "-o", out)
    assert result.code == 0, result.output
    for name in ("config.json", "model.safetensors", "tokenizer_config.json",
                 "generation_config.json", ".cellpuzzle-run.json"):
        assert (out / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(out)
    text = records[0]["user_msg"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    want, got = logits(peft_model, tok, text), logits(merged, tok, text)
    assert (want - got).abs().max().item() < 1e-4
    assert (logits(plain, tok, text) - got).abs().max().item() > 1e-3, "the adapter must matter"
    assert not any("lora" in k for k in merged.state_dict())


def test_second_run_is_a_no_op_and_a_changed_output_is_refused(cli, tiny, tmp_path):
    adapter = make_adapter(tiny, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert cli("merge-lora", adapter, "-o", out).code == 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = cli("merge-lora", adapter, "-o", out)
    assert again.code == 0, again.output
    assert_says(again, "is up to date")
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    entries = orjson.loads(cli.manifest.read_bytes())["entries"]
    assert [e["command"] for e in entries] == ["merge-lora"]
    assert {i["name"] for i in entries[0]["inputs"]} == {"adapter", "base_model"}
    (out / "extra.txt").write_text("edited by hand")
    refused = cli("merge-lora", adapter, "-o", out)
    assert_user_error(refused, "already holds results", "--overwrite")


def test_base_comes_from_the_manifest_when_the_adapter_path_is_stale(cli, tiny, tmp_path):
    from cellpuzzle_cli.manifest import Artifact, Manifest

    adapter = make_adapter(tiny, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    Manifest(cli.manifest).record("sft", {}, [Artifact(tiny, "base_model")],
                                  [Artifact(adapter, "adapter")], started=0.0)
    result = cli("merge-lora", "-o", tmp_path / "merged")  # adapter from the manifest, too
    assert result.code == 0, result.output
    entry = orjson.loads(cli.manifest.read_bytes())["entries"][-1]
    assert entry["command"] == "merge-lora" and entry["params"]["base"] == str(tiny.resolve())


def test_folder_without_adapter_config_is_refused(cli, tiny, tmp_path):
    result = cli("merge-lora", tiny, "-o", tmp_path / "merged")
    assert_user_error(result, "adapter_config.json", "not a lora adapter")
    assert not (tmp_path / "merged").exists()


def test_base_with_other_shapes_is_refused(cli, tiny, records, tmp_path):
    other = tiny_model_dir(tmp_path / "wider", records, hidden_size=96)
    adapter = make_adapter(tiny, tmp_path / "adapter")
    result = cli("merge-lora", adapter, "--base", other, "-o", tmp_path / "merged")
    assert_user_error(result, "does not fit the base model", "size mismatch", "--base")
    assert not (tmp_path / "merged").exists()
