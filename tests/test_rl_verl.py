"""`rl grpo|ppo` on the verl backend: the shipped configs compose against verl 0.9.1's own
Hydra config and pass its validation; wrong keys and unreachable clusters fail fast."""

from __future__ import annotations

import socket
import sys
import time

import pytest
from fixtures import assert_user_error, make_rl_data, tiny_model_dir

from cellpuzzle_cli.config import load_yaml, shipped_config
from cellpuzzle_cli.errors import UserError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_verl")
    train, val = make_rl_data(root / "data")
    model = tiny_model_dir(root / "model")
    return {"train": train, "val": val, "model": model}


def _args(inputs):
    return ["--data", inputs["train"], "--val-data", inputs["val"], "--model", inputs["model"]]


def _compose(result_overrides):
    from cellpuzzle_cli.rl.verl_backend import compose_config

    return compose_config(result_overrides)


def _dry(algorithm, inputs, *extra, **kw):
    from cellpuzzle_cli.manifest import Manifest
    from cellpuzzle_cli.rl.run import RLRequest, run_rl
    from cellpuzzle_cli.rl.settings import load_settings

    req = RLRequest(algorithm=algorithm, dry_run=True, train=inputs["train"], val=inputs["val"],
                    model=inputs["model"], **kw)
    settings = load_settings(algorithm, req.config_file, req.overrides)
    return run_rl(req, settings, Manifest(inputs["train"].parent / "unused.json"))


def test_grpo_dry_run_composes_cello1_settings(cli, inputs, tmp_path):
    result = cli("rl", "grpo", "--dry-run", *_args(inputs), "-o", tmp_path / "ck")
    assert result.code == 0, result.output
    flat = " ".join(result.stdout.split())
    assert "verl.trainer.main_ppo" in flat and "algorithm.adv_estimator=grpo" in flat
    assert not (tmp_path / "ck").exists()  # a dry run writes nothing

    cfg = _compose(_dry("grpo", inputs).overrides)
    actor = cfg.actor_rollout_ref.actor
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.actor_rollout_ref.rollout.n == 5
    assert (actor.use_kl_loss, actor.kl_loss_coef, actor.kl_loss_type) == (True, 0.001, "low_var_kl")
    assert actor.optim.lr == pytest.approx(1e-6)
    assert (cfg.data.train_batch_size, cfg.data.max_prompt_length,
            cfg.data.max_response_length) == (64, 3072, 3000)
    assert cfg.trainer.total_epochs == 20
    # the reward keys verl 0.9.1's main_ppo actually reads point at our reward
    assert cfg.reward.custom_reward_function.path == "pkg://cellpuzzle_cli.reward"
    assert cfg.reward.custom_reward_function.name == "compute_score"
    assert cfg.reward.reward_manager.name == "naive"
    assert cfg.data.train_files == str(inputs["train"].resolve())


def test_reward_path_loads_our_compute_score(inputs):
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from cellpuzzle_cli.reward import compute_score

    cfg = _compose(_dry("grpo", inputs).overrides)
    fn = get_custom_reward_fn(cfg)
    gt = "T cell | B cell"
    good = "<think>x</think>\n<answer>T cell | B cell</answer>"
    assert fn("cellpuzzle", good, gt, {}) == compute_score("cellpuzzle", good, gt) == 1.0


def test_ppo_dry_run_has_critic_and_warmups(cli, inputs):
    result = cli("rl", "ppo", "--dry-run", *_args(inputs), "--nnodes", "2", "--gpus-per-node", "4")
    assert result.code == 0, result.output
    cfg = _compose(_dry("ppo", inputs, nnodes=2, gpus_per_node=4).overrides)
    assert cfg.algorithm.adv_estimator == "gae"
    assert cfg.critic.optim.lr == pytest.approx(1e-5)
    assert cfg.critic.optim.lr_warmup_steps_ratio == pytest.approx(0.05)
    assert cfg.actor_rollout_ref.actor.optim.lr_warmup_steps_ratio == pytest.approx(0.1)
    assert cfg.actor_rollout_ref.actor.fsdp_config.param_offload is True
    assert cfg.critic.fsdp.optimizer_offload is True
    assert cfg.critic.model.path == str(inputs["model"].resolve())
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (2, 4)


def test_misspelt_key_exits_2_naming_it(cli, inputs):
    result = cli("rl", "grpo", "--dry-run", *_args(inputs), "actor_rollout_ref.actor.optim.lrr=1")
    assert_user_error(result, "actor_rollout_ref.actor.optim.lrr",
                      "actor_rollout_ref.actor.optim.lr'")


def test_misspelt_key_in_our_section(cli, inputs):
    assert_user_error(cli("rl", "grpo", "--dry-run", *_args(inputs), "cellpuzzle.backnd=trl"),
                      "cellpuzzle.backnd", "backend")


def test_legacy_reward_keys_are_refused(cli, inputs):
    result = cli("rl", "grpo", "--dry-run", *_args(inputs), "custom_reward_function.path=/r.py")
    assert_user_error(result, "custom_reward_function.path", "reward.custom_reward_function")
    result = cli("rl", "grpo", "--dry-run", *_args(inputs), "+reward.reward_manager=custom")
    assert_user_error(result, "reward.reward_manager.name")


def test_verl_validation_runs_in_dry_run(cli, inputs):
    # 3 prompts x 5 samples cannot be split over 8 GPUs: verl's own validate_config says so
    result = cli("rl", "grpo", "--dry-run", *_args(inputs), "data.train_batch_size=3")
    assert_user_error(result, "validation", "real_train_batch_size")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_fast(cli, inputs, tmp_path):
    t0 = time.perf_counter()
    result = cli("rl", "grpo", *_args(inputs), "--ray-address", f"127.0.0.1:{_closed_port()}",
                 "-o", tmp_path / "ck")
    assert_user_error(result, "No Ray cluster answers")
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "ck").exists()


def test_a_listener_that_is_not_ray_is_refused():
    from concurrent import futures

    import grpc

    from cellpuzzle_cli.errors import UserError
    from cellpuzzle_cli.ray_cluster import check_ray_address

    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(UserError, match="not a Ray head"):
            check_ray_address(f"127.0.0.1:{port}", 2)
    finally:
        server.stop(None)


@pytest.mark.slow
def test_a_live_ray_head_passes_the_check():
    import ray

    from cellpuzzle_cli.ray_cluster import check_ray_address

    ray.init(num_cpus=1, include_dashboard=False)
    try:
        address = ray.get_runtime_context().gcs_address
        check_ray_address(address, 5)   # the live head answers: no error
        host = address.rsplit(":", 1)[0]
        with socket.socket() as probe:  # a port nothing listens on, beside it
            probe.bind((host, 0))
            closed = probe.getsockname()[1]
        with pytest.raises(UserError, match="No Ray cluster answers"):
            check_ray_address(f"{host}:{closed}", 2)
    finally:
        ray.shutdown()


def test_ppo_on_trl_points_to_verl(cli, inputs):
    assert_user_error(cli("rl", "ppo", "--backend", "trl", *_args(inputs)), "no PPO trainer",
                      "verl")


def test_inputs_default_to_the_manifest(cli, inputs, tmp_path):
    from cellpuzzle_cli.manifest import Artifact, Manifest

    m = Manifest(cli.manifest)
    m.record("to-parquet", {}, [], [Artifact(inputs["train"], "train"),
                                    Artifact(inputs["val"], "val")], time.time())
    m.record("merge-lora", {}, [], [Artifact(inputs["model"], "model")], time.time())
    result = cli("rl", "grpo", "--dry-run")
    assert result.code == 0, result.output
    flat = "".join(result.stdout.split())
    assert f"data.train_files={inputs['train'].resolve()}" in flat
    assert f"data.val_files={inputs['val'].resolve()}" in flat
    assert f"actor_rollout_ref.model.path={inputs['model'].resolve()}" in flat


def test_real_run_needs_inputs(cli, tmp_path):
    assert_user_error(cli("rl", "grpo", "-o", tmp_path / "ck"), "to-parquet")


def test_real_run_without_gpu_stack_stops_before_launch(cli, inputs, tmp_path):
    # this CPU venv has verl but not TransferQueue/vLLM: say so before Ray starts
    pytest.importorskip("verl")
    import importlib.util

    if importlib.util.find_spec("transfer_queue") and importlib.util.find_spec("vllm"):
        pytest.skip("the GPU stack is installed here")
    result = cli("rl", "grpo", *_args(inputs), "-o", tmp_path / "ck")
    assert_user_error(result, "`gpu` extra")
    assert not (tmp_path / "ck").exists()


def test_verl_exit_code_passes_through():
    from cellpuzzle_cli.rl.verl_backend import run

    assert run([sys.executable, "-c", "import sys; print('verl log'); sys.exit(3)"]) == 3


def test_hydra_values_round_trip():
    from cellpuzzle_cli.rl.settings import hydra_value

    cases = {"pkg://a.b": "pkg://a.b", 1e-6: "1e-06", True: "true", None: "null",
             "it's": "'it\\'s'", "true": "'true'", ("console", "wandb"): "[console,wandb]",
             "/p a/x": "'/p a/x'"}
    for value, text in cases.items():
        assert hydra_value(list(value) if isinstance(value, tuple) else value) == text


@pytest.mark.parametrize("name", ["grpo.yaml", "ppo.yaml"])
def test_shipped_configs_use_no_legacy_keys(name):
    from cellpuzzle_cli.rl.settings import check_legacy, flatten

    raw = load_yaml(shipped_config(name))
    keys = list(flatten({k: v for k, v in raw.items() if k != "cellpuzzle"}))
    assert "actor_rollout_ref.actor.optim.lr" in keys   # the walk reaches nested verl keys
    for key in keys:
        check_legacy(key)
    with pytest.raises(UserError, match="legacy verl reward key"):  # and the check bites
        check_legacy("custom_reward_function.path")


def test_installed_stack_runs_verl_and_its_trl_patch():
    """verl's FSDP monkey patch imports trl's value-head model; trl 1.x lacks it (see
    docs/dependencies.md), so a resolver that drifts to trl 1.x breaks verl at run time."""
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead
    from verl.trainer import main_ppo

    assert callable(main_ppo.main)
    assert callable(AutoModelForCausalLMWithValueHead.from_pretrained)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_dry_run_with_nothing_recorded_still_checks_the_config(cli, algorithm):
    result = cli("rl", algorithm, "--dry-run")
    assert result.code == 0, result.output
    assert "placeholder" in result.output
    assert "verl.trainer.main_ppo" in result.stdout


def test_nested_yaml_config_file_with_a_typo(cli, inputs, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("cellpuzzle:\n  backend: verl\n"
                      "actor_rollout_ref:\n  rollout:\n    n: 4\n    temperatur: 0.7\n")
    assert_user_error(cli("rl", "grpo", "--dry-run", "-c", config, *_args(inputs)),
                      "actor_rollout_ref.rollout.temperatur", "actor_rollout_ref.rollout.temperature")
    config.write_text("actor_rollout_ref:\n  rollout:\n    n: 4\n")
    assert_user_error(cli("rl", "grpo", "--dry-run", "-c", config, *_args(inputs)),
                      "actor_rollout_ref.actor", "ppo_micro_batch_size_per_gpu")
    config.write_text("algorithm:\n  adv_estimator: grpo\n"
                      "actor_rollout_ref:\n  rollout:\n    n: 4\n"
                      "    log_prob_micro_batch_size_per_gpu: 1\n"
                      "  actor:\n    ppo_micro_batch_size_per_gpu: 1\n"
                      "  ref:\n    log_prob_micro_batch_size_per_gpu: 1\n")
    from cellpuzzle_cli.manifest import Manifest
    from cellpuzzle_cli.rl.run import RLRequest, run_rl
    from cellpuzzle_cli.rl.settings import load_settings

    req = RLRequest("grpo", config_file=config, dry_run=True, train=inputs["train"],
                    val=inputs["val"], model=inputs["model"])
    settings = load_settings("grpo", config)
    assert "actor_rollout_ref.rollout.n=4" in run_rl(req, settings,
                                                     Manifest(tmp_path / "m.json")).overrides
