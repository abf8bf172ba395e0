"""Training curves and reward health: what sft and rl write beside their models."""

from __future__ import annotations

import orjson

from cellpuzzle_cli.curves import METRICS_FILE, PLOT_FILE, TIMINGS_FILE, write_curves
from cellpuzzle_cli.rl.health import reward_health

HISTORY = [{"loss": 2.0, "learning_rate": 1e-3, "step": 1, "epoch": 0.1},
           {"loss": 1.0, "learning_rate": 5e-4, "step": 2, "epoch": 0.2, "reward": -1.0},
           {"train_runtime": 3.2, "train_samples_per_second": 9.9, "step": 2, "train_loss": 1.5}]


def test_curves_keep_steps_and_leave_timings_apart(tmp_path):
    write_curves(tmp_path, HISTORY, "sft", extra={2: {"legitimate_share": 0.5}})
    rows = [orjson.loads(line) for line in (tmp_path / METRICS_FILE).read_bytes().splitlines()]
    assert rows == [{"step": 1, "loss": 2.0, "learning_rate": 1e-3},
                    {"step": 2, "loss": 1.0, "learning_rate": 5e-4, "reward_mean": -1.0,
                     "legitimate_share": 0.5}]
    assert orjson.loads((tmp_path / TIMINGS_FILE).read_bytes())["train_runtime"] == 3.2
    png = (tmp_path / PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG")
    write_curves(tmp_path / "again", HISTORY, "sft", extra={2: {"legitimate_share": 0.5}})
    assert (tmp_path / "again" / PLOT_FILE).read_bytes() == png  # same numbers, same bytes


def _records(rewards_per_call: list[list[float]]) -> list[dict]:
    return [{"call": c, "reward": r} for c, rewards in enumerate(rewards_per_call) for r in rewards]


def test_all_minus_one_rewards_are_reported_as_a_no_op():
    health = reward_health(_records([[-1.0] * 8] * 3), group_size=4)
    assert health.all_flat and health.flat_from_start and health.legitimate == [0.0] * 3
    warning = health.warning()
    assert "identical in all 3 round(s)" in warning and "-1" in warning
    assert "model is unchanged" in warning


def test_spread_in_some_groups_is_healthy():
    rewards = [[-1.0, -1.0, 0.5, -1.0, -1.0, -1.0, -1.0, -1.0]] * 4
    health = reward_health(_records(rewards), group_size=4)
    assert not health.flat_from_start and health.warning() is None
    assert health.flat_groups == 4 and health.groups == 8 and health.legitimate[0] == 1 / 8


def test_a_reward_that_was_never_called():
    health = reward_health([], group_size=4)
    assert health.never_called and "never called" in health.warning()


def test_reward_trend_compares_the_first_and_last_fifth_of_the_rounds():
    rounds = [[-1.0, 0.0]] * 2 + [[0.0, 0.5]] * 6 + [[0.5, 1.0]] * 2  # 10 rounds: fifths of 2
    health = reward_health(_records(rounds), group_size=2)
    assert health.mean_reward[0] == -0.5 and health.trend() == (-0.5, 0.75)
    summary = health.summary()
    assert summary["reward_first_fifth"] == -0.5 and summary["reward_last_fifth"] == 0.75
    assert reward_health(_records([[0.0, 1.0]]), group_size=2).trend() is None
