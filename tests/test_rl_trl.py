"""`rl grpo --backend trl`: real TRL GRPO steps on a tiny model on CPU, with our reward."""

from __future__ import annotations

import json

import pytest
from fixtures import assert_user_error, make_rl_data, tiny_model_dir

# A few small steps: 2 prompts x 2 answers per step, short answers, no validation.
SMALL = ["data.train_batch_size=2", "actor_rollout_ref.rollout.n=2",
         "actor_rollout_ref.actor.ppo_mini_batch_size=2",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
         "data.max_response_length=12", "trainer.total_training_steps=2",
         "actor_rollout_ref.model.enable_gradient_checkpointing=false"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_trl")
    train, val = make_rl_data(root / "data", n_train=4, n_val=1)
    return {"train": train, "val": val, "model": tiny_model_dir(root / "model")}


def _args(inputs):
    return ["--backend", "trl", "--data", inputs["train"], "--model", inputs["model"]]


def _rows(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_trl_grpo_trains_and_logs_our_reward(cli, inputs, tmp_path):
    out = tmp_path / "rl"
    result = cli("rl", "grpo", *_args(inputs), *SMALL, "-o", out)
    assert result.code == 0, result.output
    assert "2 step(s)" in " ".join(result.output.split())
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "trainer").exists()

    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2  # steps x prompts x answers per prompt
    gold = {row["reward_model"]["ground_truth"] for row in _rows(inputs["train"])}
    assert {r["ground_truth"] for r in records} <= gold  # TRL passed our column, row by row
    # An untrained model never answers in the layout: every reward is -1, GRPO learns nothing,
    # and the run says so loudly instead of pretending it trained.
    assert {r["reward"] for r in records} == {-1.0}
    assert "rl grpo: warning" in result.output
    assert "identical in all 2 round(s)" in " ".join(result.output.split())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in logged if "reward_mean" in row]
    assert len(logged) == 2
    for call, row in enumerate(logged):
        rewards = [r["reward"] for r in records if r["call"] == call]
        assert row["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
        assert row["legitimate_share"] == sum(r > -1 for r in rewards) / len(rewards)
        assert {"loss", "learning_rate", "response_length", "kl"} <= set(row)
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "train_runtime" in json.loads((out / "timings.json").read_text())

    saved = (out / "rl-grpo.yaml").read_text()
    assert "actor_rollout_ref.rollout.n: 2" in saved and "backend: trl" in saved
    entry = json.loads(cli.manifest.read_text())["entries"][-1]
    assert entry["command"] == "rl grpo" and entry["outputs"][0]["name"] == "model"
    assert entry["summary"]["reward_health"]["rounds"] == 2

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0


def test_trl_dry_run_maps_cello1_settings(cli, inputs):
    result = cli("rl", "grpo", "--dry-run", *_args(inputs))
    assert result.code == 0, result.output
    text = result.stdout
    for expected in ("num_generations = 5", "beta = 0.001", "learning_rate = 1e-06",
                     "generation_batch_size = 320", "per_device_train_batch_size = 2",
                     "gradient_accumulation_steps = 160", "max_completion_length = 3000",
                     "num_train_epochs = 20.0"):
        assert expected in text, expected


def test_trl_checks_keys_against_verl_schema(cli, inputs):
    result = cli("rl", "grpo", "--dry-run", *_args(inputs), "actor_rollout_ref.rollout.nn=2")
    assert_user_error(result, "actor_rollout_ref.rollout.nn")


def test_trl_group_size_must_allow_a_comparison(cli, inputs):
    result = cli("rl", "grpo", "--dry-run", *_args(inputs), "actor_rollout_ref.rollout.n=1")
    assert_user_error(result, "at least 2")


def test_trl_refuses_existing_output(cli, inputs, tmp_path):
    out = tmp_path / "rl"
    out.mkdir()
    (out / "x").write_text("keep me")
    assert_user_error(cli("rl", "grpo", *_args(inputs), *SMALL, "-o", out), "--overwrite")
    assert (out / "x").read_text() == "keep me"


def test_flat_rewards_fail_the_run_when_asked(cli, inputs, tmp_path):
    out = tmp_path / "rl"
    result = cli("rl", "grpo", *_args(inputs), *SMALL, "-o", out, "--fail-on-flat-reward")
    assert_user_error(result, "identical in all 2 round(s)", "Nothing was written")
    assert not out.exists()
