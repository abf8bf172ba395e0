"""The RL reward: verl's compute_score, the TRL reward functions, and agreement with `score`."""

from __future__ import annotations

import inspect

import pytest
from fixtures import gold_records, prediction_lines, write_records
from test_answer import CASES, GOLD, tagged

from cellpuzzle_cli.reward import compute_score, make_trl_reward, trl_reward


@pytest.mark.parametrize("name,text,gold,legit,correct,exact,uniq,reward", CASES,
                         ids=[c[0] for c in CASES])
def test_reward_on_hand_made_texts(name, text, gold, legit, correct, exact, uniq, reward):
    assert compute_score("cellpuzzle", text, gold) == pytest.approx(reward)


def test_reward_equals_scores_per_prediction_view(tmp_path):
    """Write the hand-made texts as a prediction file, judge it as `score` does, compare."""
    from cellpuzzle_cli.score.judging import judge_run

    lines = prediction_lines(gold_records([c[2] for c in CASES]), [c[1] for c in CASES])
    path = write_records(tmp_path / "preds.jsonl", lines)
    judged = judge_run("run", [path])
    from_score = judge_run("run", [path], cello1_compat=True).reward.tolist()
    from_reward = [compute_score("cellpuzzle", c[1], c[2]) for c in CASES]
    assert from_score == pytest.approx(from_reward)
    assert judged.correct.tolist() == [c[4] for c in CASES]
    assert judged.exact.tolist() == [c[5] for c in CASES]


def test_case_only_repeats_per_variant():
    """README's rule: partial/exact and score count `X | x` as a repeat; cello1 as Cell-o1."""
    dup = tagged("B cells | b CELLS | T cells")
    assert compute_score(None, dup, GOLD) == pytest.approx(1 / 3)
    assert compute_score(None, dup, GOLD, {"reward_variant": "partial"}) == -1.0
    assert compute_score(None, dup, GOLD, {"reward_variant": "exact"}) == -1.0


def test_variants_and_data_source():
    swapped = tagged("NK cells | B cells | T cells")
    # any data_source is accepted, ours is tagged "cellpuzzle" but verl's defaults differ
    assert compute_score("anything/else", swapped, GOLD) == pytest.approx(1 / 6)
    assert compute_score(None, swapped, GOLD, {"reward_variant": "partial"}) == pytest.approx(1 / 3)
    assert compute_score(None, swapped, GOLD, {"reward_variant": "exact"}) == 0.0
    assert compute_score(None, tagged(GOLD), GOLD, {"reward_variant": "exact"}) == 1.0
    assert compute_score(None, "garbage", GOLD, {"reward_variant": "partial"}) == -1.0
    with pytest.raises(ValueError, match="partial"):
        compute_score(None, swapped, GOLD, {"reward_variant": "nope"})


def test_trl_reward_reads_strings_and_chat_completions():
    completions = [tagged(GOLD), [{"role": "assistant", "content": tagged("NK cells | B cells | T cells")}],
                   [{"role": "assistant", "content": "no tags"}], None]
    # TRL passes prompts, completion_ids and every dataset column as keyword arguments.
    out = trl_reward(prompts=["p"] * 4, completions=completions, completion_ids=[[1]] * 4,
                     ground_truth=[GOLD] * 4, n=[3] * 4)
    assert out == pytest.approx([1.0, 1 / 6, -1.0, -1.0])
    partial = make_trl_reward("partial")
    assert partial([tagged("NK cells | B cells | T cells")], ground_truth=[GOLD]) == pytest.approx([1 / 3])
    with pytest.raises(ValueError):
        make_trl_reward("bogus")


def test_signatures_match_what_verl_and_trl_call():
    params = list(inspect.signature(compute_score).parameters)
    assert params[:4] == ["data_source", "solution_str", "ground_truth", "extra_info"]
    assert "completions" in inspect.signature(trl_reward).parameters


def test_verl_loads_our_reward_as_a_custom_reward_function():
    """verl's own loader imports the function from the file path, as our rl config tells it."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    import cellpuzzle_cli.reward as reward_module

    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": reward_module.__file__, "name": "compute_score", "reward_kwargs": {}}}})
    fn = get_custom_reward_fn(config)
    assert fn(data_source="cellpuzzle", solution_str=tagged(GOLD), ground_truth=GOLD,
              extra_info={}) == 1.0
