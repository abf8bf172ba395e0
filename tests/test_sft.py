"""sft: assistant-only loss for any chat template, loss goes down, resume, clear errors."""

from __future__ import annotations

import orjson
import pytest
from fixtures import (
    assert_says,
    assert_user_error,
    foreign_model_dir,
    make_records,
    tiny_model_dir,
    write_records,
)

from cellpuzzle_cli.config import layer_settings
from cellpuzzle_cli.sft import SftSettings

FAST = ["lora_r=8", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
        "logging_steps=1", "eval_size=0.1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records():
    return make_records(40, seed=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, records):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", records)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, records):
    return foreign_model_dir(tmp_path_factory.mktemp("foreign") / "model", records)


@pytest.fixture
def train_file(tmp_path, records):
    return write_records(tmp_path / "train.jsonl", records)


def completion_loss(model, tok, examples) -> float:
    """Mean loss over the assistant turns of `examples`, computed independently of TRL."""
    import torch

    losses = []
    for ex in examples:
        prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
        full = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True,
                                       return_dict=False)
        ids = torch.tensor([full])
        labels = ids.clone()
        labels[0, :len(prompt)] = -100
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


# -- config ---------------------------------------------------------------------------------
def test_shipped_config_is_cello1_recipe():
    from cellpuzzle_cli.config import layer_settings
    from cellpuzzle_cli.sft import SftSettings

    s = layer_settings(SftSettings, shipped="sft.yaml")
    assert (s.lora_r, s.lora_alpha, s.lora_dropout, s.target_modules) == (256, None, 0.05, "all-linear")
    assert (s.learning_rate, s.max_length, s.rationale) == (5e-5, 4096, "template")


def test_unknown_config_key_suggests_the_right_one(cli, train_file, tiny, tmp_path):
    result = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / "a", "learning_rat=1")
    assert_user_error(result, "learning_rat", "did you mean 'learning_rate'", "valid keys")
    assert not (tmp_path / "a").exists()


def test_data_with_wrong_fields_is_refused(cli, tiny, tmp_path):
    bad = write_records(tmp_path / "bad.jsonl", [{"question": "Cell 1: CD3E", "answer": "T cell"}])
    result = cli("sft", "--model", tiny, "--data", bad, "-o", tmp_path / "a")
    assert_user_error(result, "lacks the field(s) user_msg, assistant_msg", "it has answer, question")


def test_no_model_and_empty_manifest_names_the_option(cli, train_file, tmp_path):
    result = cli("sft", "--data", train_file, "-o", tmp_path / "a")
    assert_user_error(result, "--model", "init-model")


# -- targets --------------------------------------------------------------------------------
def test_template_rationale_uses_train_markers_and_keeps_given_traces(records):
    from cellpuzzle_cli.answer import parse_answer
    from cellpuzzle_cli.rationale import build_targets

    train = records[:30]
    targets, counts = build_targets(train, "template", fit_on=train)
    assert counts == {"template": 30}
    first = parse_answer(targets[0])
    assert first.legitimate and " | ".join(first.items) == train[0]["assistant_msg"]
    # planted markers: a monocyte cell is explained by monocyte markers
    lines = [ln for t in targets for ln in t.splitlines() if ln.endswith("-> monocyte")]
    assert lines and all({"LYZ", "CD14", "S100A9"} & set(ln.split(": ")[1].split(" ->")[0].split(", "))
                         for ln in lines)
    traced = dict(train[0], assistant_msg="<think>\nmy trace\n</think>\n<answer>a | b</answer>")
    kept, counts = build_targets([traced], "template", fit_on=train)
    assert kept == [traced["assistant_msg"]] and counts == {"kept": 1}
    empty, _ = build_targets(train[:1], "none")
    assert empty[0].startswith("<think>\n") and parse_answer(empty[0]).legitimate


def test_template_without_genes_writes_one_bare_line_per_cell(records):
    from cellpuzzle_cli.answer import parse_answer
    from cellpuzzle_cli.rationale import build_targets

    targets, counts = build_targets(records[:5], "template", fit_on=records, k=0)
    assert counts == {"template": 5}
    for rec, target in zip(records, targets):
        items = rec["assistant_msg"].split(" | ")
        think = target.split("</think>")[0].removeprefix("<think>").strip().splitlines()
        assert think == [f"Cell {i} -> {t}" for i, t in enumerate(items, 1)]
        assert parse_answer(target).items == items


# -- labels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "foreign"])
def test_labels_cover_only_the_assistant_turn(which, request, records, tmp_path):
    """TRL's batches: every prompt token is -100; the labels spell exactly the target + end."""
    from cellpuzzle_cli.sft import SftSettings, make_trainer, prepare_examples

    model = request.getfixturevalue(which)
    settings = SftSettings(lora_r=4, eval_size=0)
    train, _, _ = prepare_examples(records[:4], settings)
    trainer = make_trainer(str(model), train, [], settings, tmp_path / "work")
    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for row in range(4):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        target = train[row]["completion"][0]["content"]
        kept = (labels != -100).nonzero().flatten()
        assert (labels[kept] == ids[kept]).all()
        assert kept.max() - kept.min() + 1 == len(kept), "labelled tokens must be one span"
        assert tok.decode(ids[kept]).rstrip("\n") == target + tok.eos_token
        prompt_ids = tok.apply_chat_template(train[row]["prompt"], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
        assert int(kept.min()) == len(prompt_ids)


# -- training -------------------------------------------------------------------------------
def test_sft_lowers_training_loss_and_records_the_run(cli, train_file, tiny, records, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cellpuzzle_cli.sft import SftSettings, prepare_examples

    out = tmp_path / "adapter"
    result = cli("sft", "--model", tiny, "--data", train_file, "-o", out, *FAST,
                 "max_steps=20", "learning_rate=1e-2", "lora_r=16", "warmup_steps=0")
    assert result.code == 0, result.output
    assert "train loss" in result.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
                 "sft.yaml", "metrics.jsonl", "timings.json", "curves.png"):
        assert (out / name).is_file(), name
    settings = layer_settings(SftSettings, out / "sft.yaml")  # the saved settings reload
    assert settings.max_steps == 20 and settings.lora_r == 16
    assert orjson.loads((out / "adapter_config.json").read_bytes())["lora_alpha"] == 32
    assert not (tmp_path / ".adapter.checkpoints").exists()
    entry = orjson.loads(cli.manifest.read_bytes())["entries"][-1]
    assert entry["command"] == "sft" and entry["params"]["model"] == str(tiny.resolve())
    assert {i["name"] for i in entry["inputs"]} == {"base_model", "train"}
    assert [o["name"] for o in entry["outputs"]] == ["adapter"]
    losses = [orjson.loads(x)["loss"] for x in (out / "metrics.jsonl").read_bytes().splitlines()]
    assert losses[-1] < losses[0]

    train_ex, _, _ = prepare_examples(records, settings)
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    before = completion_loss(base, tok, train_ex[:8])
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out)
    after = completion_loss(tuned, tok, train_ex[:8])
    assert after < before - 0.3, (before, after)

    again = cli("sft", "--model", tiny, "--data", train_file, "-o", out, *FAST, "max_steps=1")
    assert_user_error(again, "already holds results", "--overwrite", "--resume")


def test_foreign_model_trains(cli, train_file, foreign, tmp_path):
    out = tmp_path / "adapter"
    result = cli("sft", "--model", foreign, "--data", train_file, "-o", out, *FAST, "max_steps=2",
                 "use_dora=true")
    assert result.code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file()
    assert orjson.loads((out / "adapter_config.json").read_bytes())["use_dora"] is True


def test_same_seed_gives_the_same_bytes(cli, train_file, tiny, tmp_path):
    """Adapter, settings, logged metrics and curves: byte-identical; only timings.json differs."""
    files = ("adapter_model.safetensors", "adapter_config.json", "sft.yaml", "metrics.jsonl",
             "curves.png")
    runs = []
    for name in ("a", "b"):
        result = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / name, *FAST,
                     "max_steps=3", "eval_size=0", "--seed", "7")
        assert result.code == 0, result.output
        runs.append({f: (tmp_path / name / f).read_bytes() for f in files})
    assert runs[0] == runs[1]
    assert b"seed: 7" in runs[0]["sft.yaml"]


def test_resume_continues_from_kept_checkpoint(cli, train_file, tiny, tmp_path):
    out = tmp_path / "adapter"
    first = cli("sft", "--model", tiny, "--data", train_file, "-o", out, *FAST, "max_steps=2",
                "save_steps=2", "keep_checkpoints=true")
    assert first.code == 0, first.output
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    second = cli("sft", "--model", tiny, "--data", train_file, "-o", out, "--resume", *FAST,
                 "max_steps=4", "save_steps=2")
    assert second.code == 0, second.output
    assert "resumed from" in second.output
    log = [orjson.loads(x) for x in (out / "metrics.jsonl").read_bytes().splitlines()]
    assert max(e["step"] for e in log) == 4
    assert not (out / "checkpoints").exists()


def test_interrupted_run_asks_for_resume(cli, train_file, tiny, tmp_path):
    (tmp_path / ".adapter.checkpoints" / "checkpoint-3").mkdir(parents=True)
    result = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / "adapter")
    assert_user_error(result, "interrupted run", "--resume", "--overwrite")
    nothing = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / "other", "--resume")
    assert_user_error(nothing, "no checkpoint")


# -- from-scratch options -------------------------------------------------------------------
def test_loss_on_the_whole_sequence_labels_the_prompt_too(records, tiny, tmp_path):
    from cellpuzzle_cli.sft import SftSettings, make_trainer, prepare_examples

    settings = SftSettings(finetune="full", completion_only_loss=False, eval_size=0)
    train, _, _ = prepare_examples(records[:4], settings)
    trainer = make_trainer(str(tiny), train, [], settings, tmp_path / "work")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for row in range(4):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        real = batch["attention_mask"][row].bool()
        assert (labels[real] == ids[real]).all() and (labels[~real] == -100).all()


def test_full_finetune_trains_every_weight_and_merge_lora_copies_it(cli, train_file, tiny,
                                                                    tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "full"
    result = cli("sft", "--model", tiny, "--data", train_file, "-o", out, *FAST, "max_steps=3",
                 "learning_rate=1e-2", "finetune=full", "completion_only_loss=false")
    assert result.code == 0, result.output
    assert "Fine-tuned model written" in result.output
    assert not (out / "adapter_config.json").exists()
    base, tuned = load_file(tiny / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == tuned.keys()
    unchanged = [k for k in base if (base[k] == tuned[k]).all()]
    assert not unchanged, unchanged
    assert layer_settings(SftSettings, out / "sft.yaml").finetune == "full"

    merged = tmp_path / "merged"
    result = cli("merge-lora", out, "-o", merged)
    assert result.code == 0, result.output
    assert "nothing to merge" in " ".join(result.output.split())
    assert (merged / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    again = cli("merge-lora", out, "-o", merged)
    assert again.code == 0 and "up to date" in " ".join(again.output.split())

    preds = tmp_path / "preds"
    result = cli("predict", "--backend", "hf", "--model", merged, "--data", train_file, "-o", preds,
                 "--max-new-tokens", "4", "--batch-size", "8")
    assert result.code == 0, result.output
    assert len(list(preds.glob("*.jsonl"))) == 1


def test_unknown_finetune_mode_is_refused(cli, train_file, tiny, tmp_path):
    result = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / "a", "finetune=half")
    assert_user_error(result, "'finetune' must be one of lora, full")


def test_two_processes_train_one_adapter(tmp_path, train_file, tiny):
    """`--nproc-per-node 2` relaunches under torchrun (DDP over gloo on CPU): both processes
    train, only the first writes the adapter and the one manifest entry."""
    import subprocess
    import sys

    manifest = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cellpuzzle_cli", "--manifest", str(manifest), "sft",
         "--nproc-per-node", "2", "--model", str(tiny), "--data", str(train_file), "-o",
         str(tmp_path / "adapter"), "max_steps=6", "lora_r=8", "per_device_train_batch_size=2",
         "gradient_accumulation_steps=1", "logging_steps=1", "eval_size=0",
         "learning_rate=1e-2"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entries = orjson.loads(manifest.read_bytes())["entries"]
    assert [e["command"] for e in entries] == ["sft"]
    assert entries[0]["summary"]["processes"] == 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    losses = [orjson.loads(x)["loss"]
              for x in (tmp_path / "adapter" / "metrics.jsonl").read_bytes().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_curves_get_enough_points_and_eval_loss_leaves_training_alone(cli, train_file, tiny,
                                                                       tmp_path):
    """No logging_steps: every step of a short run is a point (the default of 10 drew 1 or 2
    here); eval loss is drawn ~10 times; how often it is drawn never changes the weights."""
    args = ["lora_r=8", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
            "eval_size=0.2", "max_steps=8"]
    runs = {}
    for name, extra in (("derived", []), ("eval-at-end", ["eval_steps=100"])):
        out = tmp_path / name
        result = cli("sft", "--model", tiny, "--data", train_file, "-o", out, *args, *extra)
        assert result.code == 0, result.output
        rows = [orjson.loads(x) for x in (out / "metrics.jsonl").read_bytes().splitlines()]
        runs[name] = (rows, (out / "adapter_model.safetensors").read_bytes())
    rows, weights = runs["derived"]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "eval_loss" in r] == list(range(1, 9))
    assert [r["step"] for r in runs["eval-at-end"][0] if "eval_loss" in r] == [8]
    assert runs["eval-at-end"][1] == weights
    entry = orjson.loads(cli.manifest.read_bytes())["entries"][0]
    assert entry["summary"]["logging_interval"] == 1


def test_an_adapter_wider_than_its_model_says_why(cli, train_file, tiny, tmp_path):
    result = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / "a",
                 "lora_r=256", "max_steps=1", "eval_size=0", "per_device_train_batch_size=1",
                 "gradient_accumulation_steps=1")
    assert result.code == 0, result.output
    assert_says(result, "more than the", "of the model it adapts: lora_r=256 is wider than the "
                "model's layers (hidden size 64)", "lora_r=8")
