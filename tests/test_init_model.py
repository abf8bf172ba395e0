"""init-model --tiny: an offline base model whose tokenizer knows the puzzles' words."""

from __future__ import annotations

import orjson
import pytest
from fixtures import assert_user_error, make_records, one_torch_thread, write_records


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def test_tiny_model_from_the_manifest_split_feeds_sft(cli, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cellpuzzle_cli.manifest import Artifact, Manifest

    records = make_records(12, seed=11)
    train = write_records(tmp_path / "splits" / "train.jsonl", records)
    Manifest(cli.manifest).record("split", {}, [], [Artifact(train, "train")], started=0.0)
    out = tmp_path / "tiny"
    result = cli("init-model", "--tiny", "-o", out)
    assert result.code == 0, result.output
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 2_000_000
    assert "<answer>" in tok.get_vocab() and tok.chat_template
    # the tokenizer learnt the puzzles' words: far fewer tokens than characters
    text = records[0]["user_msg"]
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < len(text) / 2.5
    entry = orjson.loads(cli.manifest.read_bytes())["entries"][-1]
    assert entry["command"] == "init-model" and entry["outputs"][0]["name"] == "model"

    # sft without --model or --data takes both from the manifest
    adapter = tmp_path / "adapter"
    sft = cli("sft", "-o", adapter, "max_steps=1", "lora_r=2", "gradient_accumulation_steps=1",
              "eval_size=0", "modules_to_save=[embed_tokens]")
    assert sft.code == 0, sft.output
    cfg = orjson.loads((adapter / "sft-config.json").read_bytes())
    assert cfg["base_model"] == str(out.resolve()) and cfg["modules_to_save"] == ["embed_tokens"]


def test_refusals(cli, tmp_path):
    train = write_records(tmp_path / "train.jsonl", make_records(4, seed=12))
    assert_user_error(cli("init-model", "-o", tmp_path / "m", "--data", train), "--tiny")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert_user_error(cli("init-model", "--tiny", "-o", tmp_path / "busy", "--data", train),
                   "already holds results")
    assert_user_error(cli("init-model", "--tiny", "-o", tmp_path / "m2"), "split")
