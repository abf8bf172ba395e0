"""init-model --tiny: an offline base model whose tokenizer knows the puzzles' words."""

from __future__ import annotations

import orjson
import pytest
from fixtures import assert_user_error, make_records, write_records

pytestmark = pytest.mark.usefixtures("one_thread")


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
    entry = orjson.loads(cli.manifest.read_bytes())["entries"][-1]
    assert entry["params"]["model"] == str(out.resolve())
    assert entry["params"]["modules_to_save"] == ["embed_tokens"]


def test_refusals(cli, tmp_path):
    train = write_records(tmp_path / "train.jsonl", make_records(4, seed=12))
    assert_user_error(cli("init-model", "-o", tmp_path / "m", "--data", train), "--tiny")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert_user_error(cli("init-model", "--tiny", "-o", tmp_path / "busy", "--data", train),
                      "already holds results")
    assert_user_error(cli("init-model", "--tiny", "-o", tmp_path / "m2"), "split")


def pbmc_like_records():
    """Synthetic puzzles whose cell types carry the awkward characters of real labels."""
    rename = {"T cell": "CD4+/CD45RA+/CD25- Naive T", "B cell": "CD19+ B",
              "monocyte": "CD14+ Monocyte"}
    records = make_records(12, seed=13)
    for r in records:
        for old, new in rename.items():
            r["user_msg"] = r["user_msg"].replace(old, new)
            r["assistant_msg"] = r["assistant_msg"].replace(old, new)
    return records


def test_whole_words_keep_every_gene_and_candidate_as_one_token(cli, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cellpuzzle_cli.answer import format_prediction
    from cellpuzzle_cli.prompts import parse_question, record_messages

    records = pbmc_like_records()
    train = write_records(tmp_path / "train.jsonl", records)
    out = tmp_path / "tiny"
    result = cli("init-model", "--tiny", "-o", out, "--data", train, "--hidden-size", "32",
                 "--layers", "3", "--heads", "2", "--min-gene-cells", "1")
    assert result.code == 0, result.output
    tok = AutoTokenizer.from_pretrained(out)
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (32, 3, 2, 1, 64)
    names = {w for r in records for cells, cands in [parse_question(r["user_msg"])]
             for w in [*cands, *(g for genes in cells for g in genes)]}
    assert "CD4+/CD45RA+/CD25- Naive T" in names
    for name in names:
        ids = tok(name, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == name, (name, ids)
    # whole chat texts round-trip exactly, tags and special tokens included
    for r in records:
        target = format_prediction("Cell 1: CD3D -> x", r["assistant_msg"].split(" | "))
        text = tok.apply_chat_template(record_messages(r) + [
            {"role": "assistant", "content": target}], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        answer = tok(target + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert tok.decode(answer, skip_special_tokens=True) == target
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1, tag

    rare = tmp_path / "rare"
    records[0]["user_msg"] = records[0]["user_msg"].replace("Cell 1: ", "Cell 1: ZNF9Q9, ", 1)
    assert cli("init-model", "--tiny", "-o", rare, "--data",
               write_records(tmp_path / "rare.jsonl", records)).code == 0
    by_default = AutoTokenizer.from_pretrained(rare)  # a gene of a single cell stays BPE pieces
    assert len(by_default("ZNF9Q9", add_special_tokens=False)["input_ids"]) > 1
    assert len(by_default("CD19+ B", add_special_tokens=False)["input_ids"]) == 1

    plain = tmp_path / "plain"
    assert cli("init-model", "--tiny", "-o", plain, "--data", train, "--no-whole-words").code == 0
    bpe = AutoTokenizer.from_pretrained(plain)
    assert len(bpe("CD4+/CD45RA+/CD25- Naive T", add_special_tokens=False)["input_ids"]) > 1


def test_model_shape_is_checked(cli, tmp_path):
    train = write_records(tmp_path / "train.jsonl", make_records(4, seed=12))
    assert_user_error(cli("init-model", "--tiny", "-o", tmp_path / "m", "--data", train,
                       "--hidden-size", "30", "--heads", "4"), "hidden_size (30)",
                      "multiple of heads (4)")
    assert_user_error(cli("init-model", "--tiny", "-o", tmp_path / "m", "--data", train,
                       "--layers", "0"), "'layers' must be at least 1")
    assert not (tmp_path / "m").exists()
