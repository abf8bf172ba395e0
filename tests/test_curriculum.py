"""A curriculum over puzzle size: plans parse or are refused (exit 2, nothing written), a tiny sft
run passes through every stage, a run killed mid-stage resumes in that stage, TRL GRPO stages
end by steps and by reward, verl's stages compose and pass pre-flight, score shows the gap."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from fixtures import assert_user_error, make_records, tiny_model_dir, write_records

from cellpuzzle_cli.curriculum import parse_plan
from cellpuzzle_cli.manifest import Manifest

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["lora_r=8", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
        "eval_size=0", "max_steps=10"]
PLAN = "3:4,3-4:rest"  # 4 steps of N 3, then 6 of N 3 and 4
# TRL GRPO, 2 prompts x 2 answers per step; one round of generations per step.
SMALL_RL = ["data.train_batch_size=2", "actor_rollout_ref.rollout.n=2",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "data.max_response_length=8", "trainer.total_training_steps=7",
            "actor_rollout_ref.model.enable_gradient_checkpointing=false"]


@pytest.fixture(scope="module")
def records():
    return make_records(40, seed=1)  # N 3 and 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, records):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", records)


@pytest.fixture
def train_file(tmp_path, records):
    return write_records(tmp_path / "train.jsonl", records)


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory, tiny):
    """to-parquet's train and val files of puzzles with 3 and 4 cells."""
    from cellpuzzle_cli.to_parquet import rl_rows, write_parquet

    root = tmp_path_factory.mktemp("rl")
    recs = make_records(8, seed=2, n_cells=(3, 4), genes_per_cell=4)
    write_parquet(root / "train.parquet", rl_rows(recs[:6], "train"))
    write_parquet(root / "val.parquet", rl_rows(recs[6:], "val"))
    return {"train": root / "train.parquet", "val": root / "val.parquet", "model": tiny}


def _rows(folder: Path) -> list[dict]:
    return [orjson.loads(x) for x in (folder / "metrics.jsonl").read_bytes().splitlines()]


# -- the plan ---------------------------------------------------------------------------------
def test_a_plan_parses_into_its_stages():
    stages = parse_plan("3-5:400, 6:20|reward>=0.6/20 ,3-15:rest")
    assert [(s.low, s.high, s.steps, s.rest, s.threshold, s.window) for s in stages] == [
        (3, 5, 400, False, None, None), (6, 6, 20, False, 0.6, 20),
        (3, 15, None, True, None, None)]
    assert ",".join(map(str, stages)) == "3-5:400,6:20|reward>=0.6/20,3-15:rest"


@pytest.mark.parametrize("plan, says", [
    ("5-3:4,3-4:rest", ["from N 5 down to 3", "smaller size first (3-5)"]),
    ("3:0,3-4:rest", ["'3:0' has 0 steps", "at least 1 step"]),
    ("7:4,3-4:rest", ["stage 1 (7:4) wants puzzles of N 7", "has none", "N 3, 4", "make-qa"]),
    ("3:4,4:4", ["add up to 8 steps but max_steps is 10", "rest"]),
    ("3:rest,4:2", ["only the last stage can be `rest`"]),
    ("3-4", ["'3-4' is not SIZES:LENGTH"]),
    ("3:reward>=0.5/4,4:rest", ["advances on the reward", "sft has no reward"]),
])
def test_malformed_sft_plans_are_refused_before_training(cli, train_file, tiny, tmp_path, plan,
                                                          says):
    result = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / "a", *FAST,
                 "--curriculum", plan)
    assert_user_error(result, "curriculum", *says)
    assert not (tmp_path / "a").exists() and not (tmp_path / ".a.checkpoints").exists()


def test_the_plan_is_a_setting_like_any_other(tmp_path):
    from cellpuzzle_cli.config import layer_settings
    from cellpuzzle_cli.sft import SftSettings

    config = tmp_path / "sft.yaml"
    config.write_text("max_steps: 10\ncurriculum: '3:4,3-4:rest'\n")
    assert layer_settings(SftSettings, config).stage_lengths() == [4, 6]
    over = layer_settings(SftSettings, config, ["curriculum=3:2,3-4:rest"])
    assert over.stage_lengths() == [2, 8]


def test_a_threshold_the_reward_never_reaches_is_refused(cli, rl_data):
    result = cli("rl", "grpo", "--backend", "trl", "--dry-run", "--data", rl_data["train"],
                 "--model", rl_data["model"], "--curriculum", "3:reward>=1.5/4,3-4:rest")
    assert_user_error(result, "cellpuzzle.curriculum", "mean reward of 1.5", "between -1",
                      "and 1")


# -- sft --------------------------------------------------------------------------------------
def test_a_tiny_sft_run_passes_through_every_stage(cli, train_file, tiny, tmp_path):
    out = tmp_path / "adapter"
    result = cli("sft", "--model", tiny, "--data", train_file, "-o", out, *FAST,
                 "logging_steps=3", "--curriculum", PLAN)
    assert result.code == 0, result.output
    rows = _rows(out)
    # logged every 3 steps, and at the end of each stage
    assert [(r["step"], r["stage"], r["stage_sizes"]) for r in rows] == [
        (3, 1, "3"), (4, 1, "3"), (6, 2, "3-4"), (9, 2, "3-4"), (10, 2, "3-4")]
    assert all(set(r["n_mix"]) == {"3"} for r in rows[:2])
    assert sum(sum(r["n_mix"].values()) for r in rows) == 10 * 2
    assert {"4"} <= {n for r in rows[2:] for n in r["n_mix"]}
    assert [r["step"] for r in rows if "stage_loss" in r] == [4, 10]
    stages = Manifest(cli.manifest).latest("sft").extra["summary"]["curriculum"]
    assert [(s["sizes"], s["steps"], sum(s["n_mix"].values())) for s in stages] == [
        ("3", [1, 4], 8), ("3-4", [5, 10], 12)]
    assert stages[1]["loss"] == pytest.approx(rows[-1]["stage_loss"])
    assert "stage 2      N 3-4, steps 5-10" in result.output
    assert b"curriculum: 3:4,3-4:rest" in (out / "sft.yaml").read_bytes()


def test_a_run_killed_mid_stage_resumes_in_that_stage(cli, train_file, tiny, tmp_path,
                                                     monkeypatch):
    """Killed right after the checkpoint of step 6 (stage 2): the resumed run trains steps 7-10
    on stage 2's puzzles and logs exactly what an uninterrupted run logs."""
    from transformers import TrainerCallback

    from cellpuzzle_cli import curves

    args = [*FAST, "logging_steps=1", "save_steps=2", "--curriculum", PLAN]
    whole = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / "whole", *args)
    assert whole.code == 0, whole.output

    class Kill(TrainerCallback):  # Ctrl-C as the checkpoint of step 6 is written
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    guard = curves.finite_guard
    monkeypatch.setattr(curves, "finite_guard", lambda what: Kill())
    killed = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / "cut", *args)
    assert killed.code != 0 and not (tmp_path / "cut").exists()
    assert (tmp_path / ".cut.checkpoints" / "checkpoint-6").is_dir()
    monkeypatch.setattr(curves, "finite_guard", guard)
    resumed = cli("sft", "--model", tiny, "--data", train_file, "-o", tmp_path / "cut",
                  "--resume", *args)
    assert resumed.code == 0, resumed.output
    assert "resumed from" in resumed.output and "checkpoint-6" in "".join(resumed.output.split())
    rows = _rows(tmp_path / "cut")
    assert [r["stage"] for r in rows] == [1] * 4 + [2] * 6
    assert rows == _rows(tmp_path / "whole")  # same batches, same losses, same stages


# -- rl ---------------------------------------------------------------------------------------
def test_trl_stages_end_after_their_steps_and_on_the_reward(cli, rl_data, tmp_path):
    """Stage 1 ends after 2 steps; stage 2 once the mean reward of 1 step is at least −1 (any
    reward: it ends after its first round is scored, one round later, as the loader reads
    ahead); stage 3 runs to the end."""
    out = tmp_path / "rl"
    result = cli("rl", "grpo", "--backend", "trl", "--data", rl_data["train"], "--model",
                 rl_data["model"], *SMALL_RL, "-o", out, "--curriculum",
                 "3:2,4:reward>=-1/1,3-4:rest")
    assert result.code == 0, result.output
    rows = _rows(out)
    assert [r["stage"] for r in rows] == [1, 1, 2, 2, 3, 3, 3]
    assert [set(r["n_mix"]) for r in rows[2:4]] == [{"4"}, {"4"}]
    assert all(set(r["n_mix"]) == {"3"} for r in rows[:2])
    stages = Manifest(cli.manifest).latest("rl grpo").extra["summary"]["curriculum"]
    assert [(s["sizes"], s["steps"], s["ended_by"]) for s in stages] == [
        ("3", [1, 2], "steps"), ("4", [3, 4], "reward"), ("3-4", [5, 7], "end")]
    assert stages[0]["reward"] == pytest.approx(rows[1]["stage_reward"])


def test_verl_stages_compose_and_pass_preflight_in_a_dry_run(cli, rl_data, tmp_path):
    out = tmp_path / "verl"
    result = cli("rl", "grpo", "--dry-run", "--device", "cpu", "--data", rl_data["train"],
                 "--val-data", rl_data["val"], "--model", rl_data["model"], "-o", out,
                 *SMALL_RL[:5], "trainer.total_training_steps=6", "--curriculum", "3:2,3-4:rest")
    assert result.code == 0, result.output
    text = " ".join(result.output.split())
    assert "verl accepted the config" in text
    assert "stage 1: N 3, steps 1-2 (N 3: 4)" in text and "stage 2: N 3-4, steps 3-6" in text
    staged = tmp_path / ".verl.curriculum.parquet"
    for key in ("data.shuffle=false", "trainer.total_training_steps=6",
                f"data.train_files={staged}"):
        assert key in text
    assert not staged.exists() and not out.exists()  # a dry run writes nothing


def test_verl_reads_the_stages_from_an_ordered_file(rl_data, tmp_path):
    import pyarrow.parquet as pq

    from cellpuzzle_cli.rl import curriculum
    from cellpuzzle_cli.rl.settings import load_settings

    st = load_settings("grpo", overrides={
        "data.train_files": str(rl_data["train"]), "data.train_batch_size": 2,
        "actor_rollout_ref.model.path": str(rl_data["model"]),
        "trainer.total_training_steps": 6, "cellpuzzle.curriculum": "3:2,3-4:rest"})
    vc = curriculum.plan_verl(st, tmp_path / "out", dry_run=False, notes=[])
    sizes = [r["extra_info"]["n"] for r in pq.read_table(curriculum.write_staged(vc)).to_pylist()]
    assert len(sizes) == 6 * 2 and set(sizes[:4]) == {3} and 4 in sizes[4:]
    assert st.get("data.shuffle") is False and st.get("data.train_files") == str(vc.staged)


def test_verl_stages_leave_out_the_prompts_verls_filter_would_drop(rl_data, tmp_path):
    """Rows verl's overlong filter drops would shift every later stage: they are left out of
    the stages instead, and the note says how many."""
    import pyarrow.parquet as pq

    from cellpuzzle_cli.rl import curriculum, preflight, verl_backend
    from cellpuzzle_cli.rl.settings import load_settings, to_overrides

    keys = {"data.train_files": str(rl_data["train"]), "data.train_batch_size": 2,
            "actor_rollout_ref.model.path": str(rl_data["model"]),
            "trainer.total_training_steps": 3, "cellpuzzle.curriculum": "3:1,3-4:rest"}
    cfg = verl_backend.compose_config(to_overrides(load_settings("grpo", overrides=keys).verl))
    lengths = preflight.prompt_lengths(cfg, str(rl_data["train"]),
                                       preflight.config_tokenizer(cfg))
    sizes = [r["extra_info"]["n"] for r in pq.read_table(rl_data["train"]).to_pylist()]
    limit = max(length for length, n in zip(lengths, sizes) if n == 3)
    too_long = sum(length > limit for length in lengths)
    assert too_long  # the puzzles of 4 cells have longer prompts
    st = load_settings("grpo", overrides={**keys, "data.max_prompt_length": limit,
                                          "data.filter_overlong_prompts": True})
    notes: list[str] = []
    vc = curriculum.plan_verl(st, tmp_path / "out", dry_run=False, notes=notes)
    staged = pq.read_table(curriculum.write_staged(vc)).to_pylist()
    assert {r["extra_info"]["n"] for r in staged} == {3}
    assert any(f"{too_long} prompt(s) longer than data.max_prompt_length={limit}" in note
               for note in notes)


def test_verl_refuses_reward_stages(cli, rl_data):
    result = cli("rl", "grpo", "--dry-run", "--device", "cpu", "--data", rl_data["train"],
                 "--val-data", rl_data["val"], "--model", rl_data["model"], *SMALL_RL,
                 "--curriculum", "3:reward>=0.5/2,3-4:rest")
    assert_user_error(result, "advances on the reward", "--backend trl")


# -- score ------------------------------------------------------------------------------------
def test_score_gives_each_runs_gap_to_the_optimum_by_n_beside_chance(cli, tmp_path):
    from fixtures import answered, message_text, prediction_lines

    recs = make_records(12, seed=3, n_cells=(3, 4))
    # every N 3 puzzle wrong (first two answers swapped), every N 4 puzzle right
    texts = []
    for r in recs:
        items = r["assistant_msg"].split("<answer>")[-1].split("</answer>")[0].split(" | ")
        if r["n"] == 3:
            items[0], items[1] = items[1], items[0]
        texts.append(answered(" | ".join(items)))
    preds = write_records(tmp_path / "preds.jsonl", prediction_lines(recs, texts))
    result = cli("score", preds, "--json", tmp_path / "r.json")
    assert result.code == 0, result.output
    by_n = orjson.loads((tmp_path / "r.json").read_bytes())["by_n"]
    assert set(by_n) == {"3", "4"}
    assert by_n["3"]["gap_to_optimum"] == 1.0 and by_n["4"]["gap_to_optimum"] == 0.0
    assert by_n["3"]["chance_gap_to_optimum"] == pytest.approx(1 - 1 / 6)
    assert by_n["4"]["chance_gap_to_optimum"] == pytest.approx(1 - 1 / 24)
    text = message_text(result)
    assert "gap to the optimum, 1 − exact match" in text
    assert "3 1.000 0.833" in text and "4 0.000 0.958" in text
