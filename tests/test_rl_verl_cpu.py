"""verl's real trainer on CPU (`rl --device cpu`) and the checks that run before and during it.

The slow tests run `cellpuzzle rl grpo|ppo --device cpu` for real: verl 0.9.1, Ray, FSDP2 and
our reward, in a child process with its own session and a hard timeout (Ray can hang instead
of failing). Each takes 70-120 s on two CPU cores. The fast tests cover the
pre-flight checks, which must refuse a job within seconds and before Ray starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import (
    RL_SHAPE,
    CliResult,
    assert_user_error,
    make_records,
    make_rl_data,
    run_cli,
    teach_answer_format,
    tiny_model_dir,
    write_records,
)

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = [m for m in ("verl", "ray", "cachetools", "fastapi", "uvicorn")
           if importlib.util.find_spec(m) is None]
needs_runtime = pytest.mark.skipif(
    bool(RUNTIME), reason=f"verl's trainer needs {', '.join(RUNTIME)}: pip install -e '.[dev]'")
# A small job: 2 prompts x 4 samples per step, short answers, no validation pass.
SMALL = ["data.train_batch_size=2", "actor_rollout_ref.rollout.n=4",
         "actor_rollout_ref.actor.ppo_mini_batch_size=2", "data.max_prompt_length=320",
         "data.max_response_length=40", "trainer.val_before_train=false",
         "actor_rollout_ref.actor.optim.lr=1e-4"]
RUN_TIMEOUT_S = 420  # cellpuzzle stops verl's session after this; the test waits a bit longer


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """to-parquet data and an init-model --tiny model taught the answer layout, in a manifest."""
    root = tmp_path_factory.mktemp("verl_cpu")
    manifest = root / "cellpuzzle.json"
    records = make_records(8, **RL_SHAPE)
    split = write_records(root / "splits" / "train.jsonl", records[:6])
    test = write_records(root / "splits" / "test.jsonl", records[6:])
    for args in (["to-parquet", split, "-o", root / "rl-data", "--val-size", "2"],
                 ["init-model", "--tiny", "--data", split, "-o", root / "tiny"]):
        result = run_cli(*args, manifest=manifest)
        assert result.code == 0, result.output
    model = teach_answer_format(root / "tiny", root / "rl-data" / "train.parquet", root / "model")
    return {"root": root, "manifest": manifest, "model": model, "test": test,
            "train": root / "rl-data" / "train.parquet"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("verl_cpu_small")
    train, val = make_rl_data(root / "data")
    return {"train": train, "val": val, "model": tiny_model_dir(root / "model"), "root": root}


def _args(small):
    return ["--data", small["train"], "--val-data", small["val"], "--model", small["model"]]


# -- running the CLI in its own session ------------------------------------------------------

def _kill_tree(pid: int) -> None:
    """The CLI, verl (in a session of its own) and Ray's processes under it."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for proc in [*parent.children(recursive=True), parent]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def run_isolated(*args, manifest: Path, timeout_s: float = RUN_TIMEOUT_S + 90) -> CliResult:
    """`cellpuzzle ARGS` in a child process with its own session, killed whole on timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    command = [sys.executable, "-m", "cellpuzzle_cli", "--manifest", str(manifest),
               *map(str, args), f"cellpuzzle.run_timeout_s={RUN_TIMEOUT_S}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env, cwd=manifest.parent)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"cellpuzzle {' '.join(map(str, args))} ran past {timeout_s}s:\n{out[-5000:]}")
    finally:
        _kill_tree(proc.pid)
    return CliResult(proc.returncode, out, "")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the real runs ---------------------------------------------------------------------------

@needs_runtime
@pytest.mark.slow
def test_grpo_two_steps_on_cpu_train_our_reward_and_convert(job, tmp_path):
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from cellpuzzle_cli.manifest import Manifest
    from cellpuzzle_cli.reward import compute_score

    out, rollouts = job["root"] / "rl-grpo", tmp_path / "rollouts"
    started = time.perf_counter()
    result = run_isolated("rl", "grpo", "--device", "cpu", "--model", job["model"], "-o", out,
                          *SMALL, "trainer.total_training_steps=2", "trainer.save_freq=2",
                          f"trainer.rollout_data_dir={rollouts}", manifest=job["manifest"])
    print(f"rl grpo --device cpu, 2 steps: {time.perf_counter() - started:.0f}s")
    assert result.code == 0, result.output[-8000:]
    assert "Reward canary: verl called cellpuzzle's reward" in result.output

    # verl called our compute_score in its reward workers, on our rows
    calls = _jsonl(out / "reward_calls.jsonl")
    truths = {r["reward_model"]["ground_truth"] for r in pq.read_table(job["train"]).to_pylist()}
    assert len(calls) == 2 * 2 * 4 and {c["ground_truth"] for c in calls} <= truths
    assert all(compute_score(c["data_source"], c["solution"], c["ground_truth"]) == c["score"]
               for c in calls)
    # ... and the scores verl trained on are those: its dump and its logged mean agree
    steps = {r["step"]: r["data"] for r in _jsonl(out / "verl_metrics.jsonl")}
    for step in (1, 2):
        dumped = _jsonl(rollouts / f"{step}.jsonl")
        scores = [d["score"] for d in dumped]
        logged = sorted(c["score"] for c in calls[(step - 1) * 8: step * 8])
        assert sorted(scores) == pytest.approx(logged, abs=1e-6)  # verl keeps float32
        assert steps[step]["critic/score/mean"] == pytest.approx(sum(scores) / len(scores))
    # reward spread within a prompt's samples in some step, so GRPO's advantages (and so its
    # update) are not zero there; the entropy bonus stays 0, so only our reward moves the weights
    spread = [s for s in (1, 2) if steps[s]["critic/advantages/max"] > 0]
    assert spread and all(steps[s]["actor/grad_norm"] > 0 for s in spread)

    # a checkpoint in verl's layout, converted to weights that moved
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    actor = out / "global_step_2" / "actor"
    for name in ("model_world_size_1_rank_0.pt", "fsdp_config.json", "huggingface/config.json"):
        assert (actor / name).is_file(), name
    converted = job["root"] / "rl-model"
    result = run_cli("convert-ckpt", out, "-o", converted, manifest=job["manifest"])
    assert result.code == 0, result.output
    before = load_file(str(job["model"] / "model.safetensors"))
    after = load_file(str(converted / "model.safetensors"))
    assert set(after) <= set(before)
    moved = [k for k in after if not torch.equal(after[k].float(), before[k].float())]
    assert moved, "no tensor changed after two GRPO steps"

    result = run_cli("predict", "--backend", "hf", "--model", converted, "--data", job["test"],
                     "-o", job["root"] / "preds", "--max-new-tokens", "16",
                     manifest=job["manifest"])
    assert result.code == 0, result.output

    entries = Manifest(job["manifest"]).entries()
    rl = [e for e in entries if e.command == "rl grpo"]
    assert len(rl) == 1 and rl[0].params["device"] == "cpu"
    assert rl[0].outputs[0].path == "rl-grpo"
    assert [e.command for e in entries][-2:] == ["convert-ckpt", "predict"]


@needs_runtime
@pytest.mark.slow
def test_ppo_one_step_with_critic_on_cpu(job):
    out = job["root"] / "rl-ppo"
    started = time.perf_counter()
    result = run_isolated("rl", "ppo", "--device", "cpu", "--model", job["model"], "-o", out,
                          *[a for a in SMALL if "rollout.n=" not in a],
                          "critic.ppo_micro_batch_size_per_gpu=2", "trainer.total_training_steps=1",
                          "trainer.save_freq=1", manifest=job["manifest"])
    print(f"rl ppo --device cpu, 1 step: {time.perf_counter() - started:.0f}s")
    assert result.code == 0, result.output[-8000:]
    step = _jsonl(out / "verl_metrics.jsonl")[0]["data"]
    assert "critic/vf_loss" in step and "critic/values/mean" in step
    assert _jsonl(out / "reward_calls.jsonl")
    for role in ("actor", "critic"):
        assert (out / "global_step_1" / role / "model_world_size_1_rank_0.pt").is_file(), role


@needs_runtime
@pytest.mark.slow
def test_canary_stops_a_run_that_scores_with_another_reward(job, tmp_path):
    # a reward verl does call, but that is not ours: the canary must stop the run at step 1
    module = tmp_path / "other_reward.py"
    module.write_text("def compute_score(data_source, solution_str, ground_truth, "
                      "extra_info=None, **kw):\n    return 0.0\n")
    started = time.perf_counter()
    result = run_isolated("rl", "grpo", "--device", "cpu", "--model", job["model"],
                          "-o", tmp_path / "rl", *SMALL, "trainer.total_training_steps=40",
                          "trainer.save_freq=40", f"reward.custom_reward_function.path={module}",
                          manifest=job["manifest"])
    print(f"canary run: {time.perf_counter() - started:.0f}s")
    assert_user_error(result, "never called cellpuzzle's reward",
                      "reward.custom_reward_function.path")
    logged = _jsonl(tmp_path / "rl" / "verl_metrics.jsonl")
    assert 1 <= len(logged) < 40  # stopped during the run, not after it
    assert not (tmp_path / "rl" / "global_step_40").exists()


@needs_runtime
@pytest.mark.slow
def test_grpo_curriculum_on_cpu_reads_its_stages_in_order(tmp_path):
    """verl reads the curriculum's ordered file as written: step 1 scores puzzles of 3 cells
    only, step 2 puzzles of 4 (`--curriculum 3:1,4:rest`)."""
    from cellpuzzle_cli.answer import answer_items
    from cellpuzzle_cli.to_parquet import rl_rows, write_parquet

    records = make_records(10, seed=2, n_cells=(3, 4), genes_per_cell=4)
    write_parquet(tmp_path / "train.parquet", rl_rows(records[:8], "train"))
    write_parquet(tmp_path / "val.parquet", rl_rows(records[8:], "val"))
    out = tmp_path / "rl"
    result = run_isolated("rl", "grpo", "--device", "cpu", "--data", tmp_path / "train.parquet",
                          "--val-data", tmp_path / "val.parquet", "--model",
                          tiny_model_dir(tmp_path / "model"), "-o", out, *SMALL,
                          "trainer.total_training_steps=2", "trainer.save_freq=2",
                          "--curriculum", "3:1,4:rest", manifest=tmp_path / "cellpuzzle.json")
    assert result.code == 0, result.output[-8000:]
    calls = _jsonl(out / "reward_calls.jsonl")
    assert len(calls) == 2 * 2 * 4
    sizes = [len(answer_items(c["ground_truth"])) for c in calls]
    assert sizes == [3] * 8 + [4] * 8
    assert "stage 2: N 4, steps 2-2" in " ".join(result.output.split())


# -- the CPU keys ----------------------------------------------------------------------------

def test_cpu_dry_run_sets_the_cpu_keys(cli, small, tmp_path):
    result = cli("rl", "grpo", "--device", "cpu", "--dry-run", *_args(small), "-o",
                 tmp_path / "o", *SMALL)
    assert result.code == 0, result.output
    flat = " ".join(result.stdout.split())
    for key in ("trainer.device=cpu", "actor_rollout_ref.rollout.name=hf",
                "trainer.use_v1=false", "trainer.n_gpus_per_node=1",
                "+ray_kwargs.ray_init.num_gpus=1", "actor_rollout_ref.actor.strategy=fsdp2",
                "reward.custom_reward_function.path=pkg://cellpuzzle_cli.reward",
                "env_vars.CELLPUZZLE_REWARD_LOG="):
        assert key in flat, key
    assert "replaced actor_rollout_ref.rollout.name=vllm" in " ".join(result.stderr.split())


def test_cpu_refuses_what_it_cannot_run(cli, small):
    assert_user_error(cli("rl", "grpo", "--device", "cpu", "--dry-run", *_args(small),
                     "actor_rollout_ref.rollout.name=vllm"),
                      "--device cpu needs actor_rollout_ref.rollout.name=hf")
    assert_user_error(cli("rl", "grpo", "--device", "cpu", "--dry-run", *_args(small),
                     "--ray-address", "127.0.0.1:1"), "drop --ray-address")


def test_other_verl_versions_are_refused():
    from cellpuzzle_cli.errors import UserError
    from cellpuzzle_cli.rl.cpu_mode import check_verl_version

    check_verl_version("0.9.1")
    with pytest.raises(UserError, match="supports verl 0.9.1 only"):
        check_verl_version("0.10.0")


def test_plugin_loads_through_verls_hook_in_a_fresh_process():
    from cellpuzzle_cli.rl import cpu_mode

    probe = (
        "import torch, verl\n"
        "from verl.utils.device import get_device_name, get_nccl_backend, get_device_id\n"
        "from verl.utils.device import get_torch_device\n"
        "import verl.utils.distributed as d, verl.utils.fsdp_utils as f\n"
        "from verl.workers.rollout.base import _ROLLOUT_REGISTRY\n"
        "from verl.workers.rollout.replica import RolloutReplicaRegistry\n"
        "print(get_device_name(), get_nccl_backend(), get_device_id() == torch.device('cpu'),\n"
        "      f.CPUOffloadPolicy().pin_memory, get_torch_device().max_memory_allocated(),\n"
        "      RolloutReplicaRegistry.get('hf').__name__, ('hf', 'async') in _ROLLOUT_REGISTRY,\n"
        "      d.initialize_global_process_group_ray.__module__)\n")
    env = cpu_mode.environment(dict(os.environ))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["cpu", "gloo", "True", "False", "0", "HFReplica", "True",
                                   "cellpuzzle_cli.rl.verl_cpu"]


def test_hf_rollout_server_generates_with_logprobs_and_takes_weights(small):
    import torch
    from transformers import AutoModelForCausalLM
    from verl.utils.config import omega_conf_to_dataclass

    from cellpuzzle_cli.rl.hf_rollout import HFRolloutServer
    from cellpuzzle_cli.rl.verl_backend import compose_config

    cfg = compose_config(["actor_rollout_ref.rollout.name=hf", "data.max_response_length=6",
                          f"actor_rollout_ref.model.path={small['model']}"])
    server = HFRolloutServer(omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout),
                             cfg.actor_rollout_ref.model, replica_rank=0)
    prompt = [5, 6, 7, 8]
    greedy = {"temperature": 0, "logprobs": True}
    out = asyncio.run(server.generate(prompt, greedy, request_id="a"))
    assert 1 <= len(out.token_ids) <= 6 and len(out.log_probs) == len(out.token_ids)
    model = AutoModelForCausalLM.from_pretrained(small["model"])
    with torch.no_grad():  # greedy log-probs are the model's own, token by token
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits, -1)[range(len(out.token_ids)), out.token_ids]
    assert out.log_probs == pytest.approx(expected.tolist(), abs=1e-4)

    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    assert asyncio.run(server.load_weights(state, global_steps=3)) == len(state)
    after = asyncio.run(server.generate(prompt, greedy, request_id="b"))
    assert after.extra_fields["global_steps"] == 3 and after.token_ids != out.token_ids


# -- pre-flight: each refuses within seconds, before Ray starts ------------------------------

def _refused_fast(cli, tmp_path, *args, fragments):
    started = time.perf_counter()
    result = cli("rl", *args, "-o", tmp_path / "out")
    assert_user_error(result, *fragments)
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "out").exists()  # nothing launched, nothing written
    return result


def test_batch_that_does_not_split_over_the_gpus_is_refused(cli, small, tmp_path):
    # verl's validate_config accepts this; its worker asserts it after Ray started
    _refused_fast(cli, tmp_path, "grpo", *_args(small), "--gpus-per-node", "2",
                  "data.train_batch_size=2", "actor_rollout_ref.rollout.n=3",
                  "actor_rollout_ref.actor.ppo_mini_batch_size=1",
                  "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
                  fragments=["actor_rollout_ref.actor.ppo_mini_batch_size",
                             "cannot be split over 2"])


def test_micro_batch_that_does_not_divide_a_ranks_share_is_refused(cli, small, tmp_path):
    _refused_fast(cli, tmp_path, "grpo", "--device", "cpu", *_args(small),
                  "data.train_batch_size=4", "actor_rollout_ref.rollout.n=2",
                  "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                  "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
                  fragments=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
                             "divides 4"])


def test_rollout_parallelism_that_does_not_divide_the_gpus_is_refused(cli, small, tmp_path):
    _refused_fast(cli, tmp_path, "grpo", *_args(small), "--gpus-per-node", "3",
                  "data.train_batch_size=3", "actor_rollout_ref.actor.ppo_mini_batch_size=3",
                  "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=5",
                  fragments=["actor_rollout_ref.rollout.tensor_model_parallel_size=2",
                             "does not divide the 3 GPUs"])


def test_over_long_prompts_are_counted_and_refused(cli, small, tmp_path):
    result = _refused_fast(cli, tmp_path, "grpo", "--device", "cpu", *_args(small),
                           "data.max_prompt_length=100", "data.filter_overlong_prompts=false",
                           fragments=["4 of 4 prompts", "data.max_prompt_length=100",
                                      "the longest has"])
    longest = int(" ".join(result.output.split()).split("the longest has ")[1].split(")")[0])
    assert longest > 200


def test_filtered_prompts_that_leave_no_batch_are_refused(cli, small, tmp_path):
    _refused_fast(cli, tmp_path, "grpo", "--device", "cpu", *_args(small),
                  "data.max_prompt_length=100", "data.filter_overlong_prompts=true",
                  "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                  fragments=["only 0 prompt(s) that fit", "Train dataloader is empty"])


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_missing_or_empty_model_folder_is_refused(cli, small, tmp_path, folder):
    model = tmp_path / folder
    if folder == "empty":
        model.mkdir()
    _refused_fast(cli, tmp_path, "grpo", "--device", "cpu", "--data", small["train"],
                  "--val-data", small["val"], "--model", model,
                  fragments=["actor_rollout_ref.model.path", str(model)])


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_ppo_dry_run_without_the_model_passes_and_says_so(cli, small, tmp_path, folder):
    model = tmp_path / folder
    if folder == "empty":
        model.mkdir()
    result = cli("rl", "ppo", "--dry-run", "--data", small["train"], "--val-data", small["val"],
                 "--model", model)
    assert result.code == 0, result.output
    text = " ".join(result.output.split())
    assert "sentencepiece" not in text and "tiktoken" not in text
    assert "critic.model.path" in text and "A real run needs the model folder" in text
    assert "verl.trainer.main_ppo" in result.stdout


# -- the reward canary -----------------------------------------------------------------------

def _metrics_line(step: int) -> str:
    return json.dumps({"step": step, "data": {"critic/score/mean": -1.0}})


def test_canary_stops_a_process_whose_first_step_called_no_reward(tmp_path):
    """A stand-in for verl (a real child process) logs a step without reward calls."""
    from cellpuzzle_cli.errors import UserError
    from cellpuzzle_cli.rl.preflight import RewardCanary
    from cellpuzzle_cli.rl.verl_backend import run

    canary = RewardCanary(tmp_path, grace_s=0)
    script = (f"import pathlib, time\npathlib.Path({str(canary.metrics_log)!r}).write_text("
              f"{_metrics_line(1)!r} + '\\n')\ntime.sleep(120)\n")
    started = time.perf_counter()
    with pytest.raises(UserError, match="never called cellpuzzle's reward"):
        run([sys.executable, "-c", script], watch=canary.check, poll_s=0.2)
    assert time.perf_counter() - started < 30


def test_canary_passes_once_the_reward_is_called(tmp_path, monkeypatch):
    from cellpuzzle_cli.reward import REWARD_LOG_ENV, compute_score
    from cellpuzzle_cli.rl.preflight import RewardCanary

    canary = RewardCanary(tmp_path, grace_s=0)
    canary.metrics_log.write_text(_metrics_line(1) + "\n")
    assert canary.check(0.0) is None  # first sight of a step: waits for a shared file system
    assert "never called" in canary.check(1.0)
    assert "never called" in canary.final(0)
    monkeypatch.setenv(REWARD_LOG_ENV, str(canary.reward_log))
    compute_score("cellpuzzle", "<answer>T cell | B cell</answer>", "T cell | B cell")
    assert canary.calls() == 1 and canary.check(2.0) is None and canary.final(0) is None


def test_run_timeout_stops_the_whole_session(tmp_path):
    import psutil

    from cellpuzzle_cli.rl.verl_backend import TIMEOUT_EXIT, run

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time, pathlib\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
              f"pathlib.Path({str(pid_file)!r}).write_text(str(c.pid))\ntime.sleep(300)\n")
    assert run([sys.executable, "-c", script], timeout_s=3, poll_s=0.5) == TIMEOUT_EXIT
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != "zombie":
        assert time.time() < deadline, "the grandchild survived the timeout"
        time.sleep(0.2)
