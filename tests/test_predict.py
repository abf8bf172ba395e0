"""predict end to end on a tiny real model: lines, shards, resume after SIGKILL, retries, manifest."""

from __future__ import annotations

import hashlib
import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from fixtures import assert_user_error, make_records, tiny_model_dir, write_records

from cellpuzzle_cli.config import layer_settings
from cellpuzzle_cli.io import iter_jsonl
from cellpuzzle_cli.manifest import Artifact, Manifest
from cellpuzzle_cli.predict.settings import PredictJob, PredictSettings
from cellpuzzle_cli.predict.shard_run import run_predict
from cellpuzzle_cli.predict.shards import Shard, select_shard

LONG = ("puzzle-004", "puzzle-009")
# Many background genes, so prompts differ from puzzle to puzzle and LONG ones can be long.
SHAPE = {"background": 300, "long_ids": LONG}
GEN = ["--backend", "hf", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    records = make_records(12, **SHAPE)
    data = write_records(base / "test.jsonl", records)
    model = tiny_model_dir(base / "model", records + make_records(20, seed=1, **SHAPE),
                           vocab_size=4096, varied=True)
    return {"records": records, "data": data, "model": model, "base": base}


def lines(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


def reference_answers(model_dir: Path, records: list[dict], max_new_tokens: int) -> dict[str, str]:
    """One prompt at a time with plain transformers: what batching must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cellpuzzle_cli.prompts import record_messages

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = {}
    for r in records:
        ids = tok.apply_chat_template(record_messages(r), add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        out[r["puzzle_id"]] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


def test_shipped_config_loads_with_overrides():
    cfg = layer_settings(PredictSettings, None, {"temperature": 0.7, "n": 4}, shipped="predict.yaml")
    assert (cfg.backend, cfg.temperature, cfg.n, cfg.max_new_tokens) == ("auto", 0.7, 4, 1024)


def test_hf_backend_batched_lines_equal_one_at_a_time_generation(cli, assets, tmp_path):
    out = tmp_path / "preds"
    result = cli("predict", "--model", assets["model"], "--data", assets["data"], "-o", out,
                 *GEN, "--batch-size", "5")
    assert result.code == 0, result.output
    rows = lines(out / "shard-0-of-1.jsonl")
    # Batches ran longest-first; the finished file is back in the canonical shard order.
    assert [r["puzzle_id"] for r in rows] == sorted(
        (r["puzzle_id"] for r in rows), key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    by_id = {r["puzzle_id"]: r for r in rows}
    assert set(by_id) == {r["puzzle_id"] for r in assets["records"]}
    expected = reference_answers(assets["model"], assets["records"], 6)
    assert {pid: r["prediction"] for pid, r in by_id.items()} == expected
    assert len(set(expected.values())) > 3  # the answers really differ between puzzles
    gold = {r["puzzle_id"]: r for r in assets["records"]}
    for pid, row in by_id.items():
        assert row["answer"] == gold[pid]["assistant_msg"] and row["n"] == gold[pid]["n"]
        assert row["backend"] == "hf" and row["model"] == str(assets["model"].resolve())
        assert row["error"] is None and row["completion_tokens"] == 6 and row["prompt_tokens"] > 50
    run = orjson.loads((out / ".predict-run.json").read_bytes())
    assert run["max_new_tokens"] == 6
    saved = layer_settings(PredictSettings, out / "predict.yaml")  # reloads as a --config file
    assert saved.max_new_tokens == 6 and saved.batch_size == 5 and saved.backend == "hf"


def test_three_shards_cover_the_set_and_are_recorded_for_score(cli, assets, tmp_path):
    out = tmp_path / "preds"
    for i in range(3):
        result = cli("predict", "--model", assets["model"], "--data", assets["data"], "-o", out,
                     "--shard", f"{i}/3", *GEN)
        assert result.code == 0, result.output
    ids = [[r["puzzle_id"] for r in lines(out / f"shard-{i}-of-3.jsonl")] for i in range(3)]
    assert sorted(x for shard in ids for x in shard) == sorted(r["puzzle_id"] for r in assets["records"])
    assert [len(x) for x in ids] == [4, 4, 4]
    m = Manifest(cli.manifest)
    entries = [e for e in m.entries() if e.command == "predict"]
    assert [e.params["shard_index"] for e in entries] == [0, 1, 2]
    for i, e in enumerate(entries):
        p = e.params
        assert (p["num_shards"], p["complete"], p["backend"]) == (3, True, "hf")
        assert m.resolve(p["output_dir"]) == out.resolve()
        assert p["model"] == str(assets["model"].resolve())
        assert [(o.name, o.path) for o in e.outputs] == [
            ("predictions", m.relative(out / f"shard-{i}-of-3.jsonl"))]


def test_sigkilled_shard_resumes_to_the_exact_set_without_duplicates(cli, assets, tmp_path):
    records = make_records(40, seed=3)
    data = write_records(tmp_path / "test40.jsonl", records)
    out = tmp_path / "preds"
    shard_file = out / "shard-1-of-2.jsonl"
    cmd = [sys.executable, "-m", "cellpuzzle_cli", "--manifest", str(cli.manifest), "predict",
           "--model", str(assets["model"]), "--data", str(data), "-o", str(out), "--shard", "1/2",
           "--backend", "hf", "--batch-size", "1", "--max-new-tokens", "24", "min_new_tokens=24"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if shard_file.exists() and shard_file.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    written = shard_file.read_bytes().count(b"\n")
    assert 3 <= written < 20, f"the run was not killed mid-way ({written} lines)"
    with open(shard_file, "ab") as fh:  # as if the kill had landed inside a write
        fh.write(b'{"puzzle_id": "puzzle-0')
    assert not Manifest(cli.manifest).entries()  # an unfinished shard is not recorded

    result = cli("predict", "--model", assets["model"], "--data", data, "-o", out,
                 "--shard", "1/2", "--backend", "hf", "--batch-size", "4", "--max-new-tokens",
                 "24", "min_new_tokens=24")
    assert result.code == 0, result.output
    ids = [r["puzzle_id"] for r in lines(shard_file)]
    expected = [r["puzzle_id"] for r in select_shard(records, Shard(1, 2))]
    assert ids == expected and len(set(ids)) == 20
    entry = Manifest(cli.manifest).entries()[-1]
    assert entry.params["resumed"] == written and entry.params["complete"] is True


def test_resume_with_other_settings_is_refused(cli, assets, tmp_path):
    out = tmp_path / "preds"
    args = ["predict", "--model", assets["model"], "--data", assets["data"], "-o", out,
            "--shard", "0/3", "--backend", "hf"]
    assert cli(*args, "--max-new-tokens", "2").code == 0
    assert_user_error(cli(*args, "--max-new-tokens", "3"), "max_new_tokens", "--overwrite")
    assert cli(*args, "--max-new-tokens", "3", "--overwrite").code == 0
    other = cli("predict", "--model", assets["model"], "--data", assets["data"], "-o",
                assets["model"], "--backend", "hf")
    assert_user_error(other, "is an input of this run", "give -o another path")


class FlakyBackend:
    """The real hf backend, but batches larger than 2 holding a marked puzzle run out of memory."""

    def __init__(self, inner, marked: str):
        self.inner, self.marked, self.calls = inner, marked, []
        self.name, self.model_label, self.default_batch_size = "hf", inner.model_label, 8

    def sort_key(self, record):
        return self.inner.sort_key(record)

    def generate(self, records):
        import torch

        self.calls.append(len(records))
        if len(records) > 2 and any(r["puzzle_id"] == self.marked for r in records):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.inner.generate(records)

    def recover(self):
        self.inner.recover()


def test_out_of_memory_batch_is_retried_smaller_and_answers_stay_real(assets, tmp_path):
    from cellpuzzle_cli.predict.hf_backend import GQA_ATTENTION, HFBackend

    cfg = PredictSettings(backend="hf", max_new_tokens=4, batch_size=8)
    flaky = FlakyBackend(HFBackend(assets["model"], cfg), marked="puzzle-002")
    settings = PredictJob(data=assets["data"], output_dir=tmp_path / "p",
                               model=assets["model"], settings=cfg)
    result = run_predict(settings, backend_obj=flaky)
    assert result.errors == 0 and result.generated == 12
    assert 4 in flaky.calls and max(flaky.calls) == 8  # 8 failed, split into halves of 4, 2
    rows = {r["puzzle_id"]: r for r in lines(result.shard_file)}
    backend = HFBackend(assets["model"], cfg)
    # The tiny model groups its query heads, so the copy-free grouped SDPA path is the one tested.
    assert backend.model.config._attn_implementation == GQA_ATTENTION
    plain = backend.generate([r for r in assets["records"] if r["puzzle_id"] == "puzzle-002"])
    assert rows["puzzle-002"]["prediction"] == plain[0].texts[0]
    assert rows["puzzle-002"]["batch_size"] <= 2


def test_prompts_too_long_become_errors_not_answers(cli, assets, tmp_path):
    out = tmp_path / "preds"
    result = cli("predict", "--model", assets["model"], "--data", assets["data"], "-o", out,
                 *GEN, "--batch-size", "6", "--max-model-len", "700")
    assert result.code == 0, result.output
    assert "2 puzzle(s) failed" in " ".join(result.output.split())
    rows = {r["puzzle_id"]: r for r in lines(out / "shard-0-of-1.jsonl")}
    for pid, row in rows.items():
        if pid in LONG:
            assert row["prediction"] is None and "exceeds the model length 700" in row["error"]
        else:
            assert row["error"] is None and isinstance(row["prediction"], str)
    assert Manifest(cli.manifest).entries()[-1].params["errors"] == 2
    result = cli("predict", "--model", assets["model"], "--data", assets["data"], "-o", out, *GEN,
                 "--retry-errors")
    assert result.code == 0, result.output
    rows = lines(out / "shard-0-of-1.jsonl")
    assert len(rows) == 12 and all(r["error"] is None for r in rows)
    assert Manifest(cli.manifest).entries()[-1].params["resumed"] == 10


def test_vllm_backend_without_vllm_names_the_extra(cli, assets, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from cellpuzzle_cli.errors import UserError
    from cellpuzzle_cli.predict.vllm_backend import import_vllm

    with pytest.raises(UserError, match=r"pip install 'cellpuzzle\[gpu\]'"):
        import_vllm()
    result = cli("predict", "--model", assets["model"], "--data", assets["data"],
                 "-o", tmp_path / "v", "--backend", "vllm")
    assert_user_error(result, "needs vllm", "pip install", "--backend hf")
    assert not (tmp_path / "v" / "shard-0-of-1.jsonl").exists()


@pytest.mark.parametrize("settings", [{"max_new_tokens": 64},
                                      {"temperature": 0.7, "top_p": 0.9, "n": 4, "seed": 3,
                                       "min_new_tokens": 5}])
def test_vllm_sampling_settings_match_the_hf_backend(assets, settings):
    """Both backends must sample alike, or the same config gives other answers on a GPU."""
    from cellpuzzle_cli.predict.hf_backend import HFBackend
    from cellpuzzle_cli.predict.vllm_backend import sampling_kwargs

    config = PredictSettings(**settings)
    vllm = sampling_kwargs(config)
    hf = HFBackend(assets["model"], config).generation_config
    greedy = not hf.do_sample
    assert (vllm["n"], vllm["max_tokens"]) == (hf.num_return_sequences, hf.max_new_tokens)
    assert vllm.get("min_tokens") == hf.min_new_tokens
    assert (vllm["temperature"] == 0) == greedy   # vLLM samples greedily at temperature 0
    if not greedy:
        assert (vllm["temperature"], vllm["top_p"]) == (hf.temperature, hf.top_p)


def test_vllm_engine_settings_and_outputs(assets):
    from types import SimpleNamespace as NS

    from cellpuzzle_cli.predict.vllm_backend import llm_kwargs, to_generations

    kw = llm_kwargs(assets["model"], PredictSettings(tensor_parallel_size=2, max_model_len=4096), False)
    assert (kw["tensor_parallel_size"], kw["max_model_len"], kw["trust_remote_code"]) == (2, 4096, False)
    out = NS(prompt_token_ids=[1, 2, 3], outputs=[NS(text="a", token_ids=[5, 6]), NS(text="b", token_ids=[7])])
    gen = to_generations([out])[0]
    assert (gen.texts, gen.prompt_tokens, gen.completion_tokens) == (["a", "b"], 3, 3)


def test_greedy_with_several_samples_is_refused(cli, assets, tmp_path):
    result = cli("predict", "--model", assets["model"], "--data", assets["data"],
                 "-o", tmp_path / "x", "--backend", "hf", "--n", "3")
    assert_user_error(result, "--temperature")


def test_sampling_n_answers_per_puzzle(cli, assets, tmp_path):
    out = tmp_path / "s"
    result = cli("predict", "--model", assets["model"], "--data", assets["data"], "-o", out,
                 "--shard", "0/4", *GEN, "--n", "3", "--temperature", "1.0", "--seed", "5")
    assert result.code == 0, result.output
    rows = lines(out / "shard-0-of-4.jsonl")
    assert all(len(r["samples"]) == 3 and r["prediction"] == r["samples"][0] for r in rows)
    assert any(len(set(r["samples"])) > 1 for r in rows)


def test_model_and_data_default_to_the_manifest(cli, assets, tmp_path):
    m = Manifest(cli.manifest)
    m.record("split", {}, [], [Artifact(assets["data"], "test")], time.time())
    m.record("init-model", {}, [], [Artifact(assets["model"], "model")], time.time())
    out = tmp_path / "d"
    result = cli("predict", "-o", out, "--shard", "2/3", *GEN)
    assert result.code == 0, result.output
    assert len(lines(out / "shard-2-of-3.jsonl")) == 4
    entry = Manifest(cli.manifest).entries()[-1]
    assert {i.name for i in entry.inputs} == {"test", "model"}


def test_model_defaults_to_the_newest_rl_model(cli, assets, tmp_path):
    m = Manifest(cli.manifest)
    m.record("split", {}, [], [Artifact(assets["data"], "test")], time.time())
    m.record("init-model", {}, [], [Artifact(tmp_path, "model")], time.time())
    m.record("rl grpo", {}, [], [Artifact(assets["model"], "model")], time.time())
    result = cli("predict", "-o", tmp_path / "d", "--shard", "0/3", *GEN)
    assert result.code == 0, result.output
    assert {r["model"] for r in lines(tmp_path / "d" / "shard-0-of-3.jsonl")} == {
        str(Path(assets["model"]).resolve())}


def test_baseline_backend_via_the_cli(cli, assets, tmp_path):
    pytest.importorskip("cellpuzzle_cli.baseline")
    train = write_records(tmp_path / "train.jsonl", make_records(30, seed=9))
    Manifest(cli.manifest).record("split", {}, [], [Artifact(train, "train"),
                                                    Artifact(assets["data"], "test")], time.time())
    out = tmp_path / "b"
    result = cli("predict", "--backend", "baseline", "-o", out)
    assert result.code == 0, result.output
    rows = lines(out / "shard-0-of-1.jsonl")
    assert len(rows) == 12 and all(r["backend"] == "baseline" and r["error"] is None for r in rows)
    for row, rec in zip(sorted(rows, key=lambda r: r["puzzle_id"]), assets["records"]):
        assert "<answer>" in row["prediction"]
        answer = row["prediction"].split("<answer>")[1].split("</answer>")[0]
        assert sorted(t.strip() for t in answer.split("|")) == sorted(rec["assistant_msg"].split(" | "))
    entry = Manifest(cli.manifest).entries()[-1]
    assert {i.name for i in entry.inputs} == {"test", "train"}


def test_ray_runs_the_shards_like_launching_them_by_hand(cli, assets, tmp_path):
    pytest.importorskip("ray")
    by_hand, on_ray = tmp_path / "hand", tmp_path / "ray"
    for i in range(2):
        assert cli("predict", "--model", assets["model"], "--data", assets["data"], "-o", by_hand,
                   "--shard", f"{i}/2", *GEN).code == 0
    result = cli("predict", "--model", assets["model"], "--data", assets["data"], "-o", on_ray,
                 "--ray", "--num-shards", "2", *GEN)
    assert result.code == 0, result.output
    keep = ("puzzle_id", "prediction", "answer", "n", "model", "backend", "error")
    for i in range(2):
        name = f"shard-{i}-of-2.jsonl"
        assert ([{k: r[k] for k in keep} for r in lines(on_ray / name)]
                == [{k: r[k] for k in keep} for r in lines(by_hand / name)])
    entries = [e for e in Manifest(cli.manifest).entries() if e.command == "predict"]
    assert sorted(e.params["shard_index"] for e in entries[2:]) == [0, 1]


def test_ray_address_that_nobody_listens_on_is_a_clear_error(cli, assets, tmp_path):
    result = cli("predict", "--model", assets["model"], "--data", assets["data"], "-o", tmp_path / "r",
                 "--ray", "--num-shards", "2", "--ray-address", "127.0.0.1:1", *GEN)
    assert_user_error(result, "no ray cluster answers at 127.0.0.1:1")


def test_a_wrong_model_path_leaves_nothing_and_the_corrected_run_works(cli, assets, tmp_path):
    out = tmp_path / "typo"
    result = cli("predict", "--model", tmp_path / "no-such-model", "--data", assets["data"],
                 "-o", out, *GEN)
    assert_user_error(result, "no-such-model")
    assert not out.exists()
    result = cli("predict", "--model", assets["model"], "--data", assets["data"], "-o", out, *GEN)
    assert result.code == 0, result.output
