"""The GPU check: sft in bf16, predict with transformers and GRPO (TRL) on a realistic shape.

Builds a randomly initialised Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV
heads, vocabulary 151,936) with the project's tokenizer, synthetic puzzles with real marker-gene
symbols, then runs the real commands through `python -m cellpuzzle_cli`:

1. `sft` (LoRA r 64, bf16 on CUDA)      -> training tokens/s
2. `merge-lora`, then `predict --backend hf` with fixed-length answers -> generated tokens/s
3. `to-parquet`, then `rl grpo --backend trl` -> GRPO steps/s

Prints one JSON summary (also written to OUT/gpu_check.json). `--smoke` shrinks everything so
the script itself can be checked on a CPU. Usually started by bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import puzzles  # real gene symbols and cell types

QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936}
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096}


def build_model(out: Path, texts: list[str], shape: dict[str, int], bf16: bool) -> int:
    """A random model of `shape` with the project's puzzle tokenizer; returns its parameters."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from cellpuzzle_cli.init_model import train_tokenizer

    tokenizer = train_tokenizer(texts, 4096)
    config = Qwen2Config(**{**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))},
                         max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    if bf16:
        model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id,
                                               do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def cli(manifest: Path, *args: object, log: Path) -> float:
    """Run one cellpuzzle command (the real CLI, in its own process); returns its wall time."""
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(f"\n$ cellpuzzle {' '.join(map(str, args))}\n".encode())
        fh.flush()
        proc = subprocess.run([sys.executable, "-m", "cellpuzzle_cli", "--manifest", str(manifest),
                               *map(str, args)], stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"cellpuzzle {args[0]} failed (exit {proc.returncode}):\n{tail}")
    return time.perf_counter() - t0


def mean_tokens(model: Path, records: list[dict]) -> float:
    """Mean length in tokens of a training example (chat template, prompt + answer)."""
    from transformers import AutoTokenizer

    from cellpuzzle_cli.prompts import record_messages

    tok = AutoTokenizer.from_pretrained(model)
    lengths = [len(tok.apply_chat_template(record_messages(r, with_answer=True), tokenize=True,
                                           return_dict=True)["input_ids"]) for r in records]
    return sum(lengths) / len(lengths)


def generated_tokens_per_s(shard: Path) -> tuple[float, int]:
    """Completion tokens over generation time, from predict's own per-line batch timings."""
    rows = [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
    tokens = sum(r["completion_tokens"] or 0 for r in rows)
    seconds = sum(r["batch_seconds"] / r["batch_size"] for r in rows)
    return tokens / seconds, tokens


def train_seconds(folder: Path, fallback: float) -> float:
    """The trainer's own runtime (timings.json) when the command wrote one, else wall time."""
    timings = folder / "timings.json"
    if timings.is_file():
        return float(json.loads(timings.read_text()).get("train_runtime", fallback))
    return fallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and steps (CPU check)")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--grpo-steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    steps, grpo_steps = (3, 2) if smoke else (args.sft_steps, args.grpo_steps)
    prompts, new_tokens = (8, 16) if smoke else (args.prompts, args.new_tokens)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work, log, manifest = out / "work", out / "commands.log", out / "work" / "cellpuzzle.json"
    work.mkdir(exist_ok=True)
    log.write_text("")
    from cellpuzzle_cli.io import write_jsonl

    train = write_jsonl(work / "train.jsonl", puzzles(512, 20, seed=1)) and work / "train.jsonl"
    test_records = puzzles(prompts, 20, seed=2)
    write_jsonl(work / "test.jsonl", test_records)
    train_records = [json.loads(x) for x in train.read_text().splitlines()]
    texts = [r[k] for r in train_records for k in ("system_msg", "user_msg", "assistant_msg")]

    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": smoke,
        "python": platform.python_version()}
    t0 = time.perf_counter()
    model = work / "model"
    result["parameters"] = build_model(model, texts, SMOKE if smoke else QWEN2_05B, bf16=cuda)
    result["build_model_s"] = round(time.perf_counter() - t0, 1)

    batch = 8
    wall = cli(manifest, "sft", "--model", model, "--data", train, "-o", work / "adapter",
               f"max_steps={steps}", f"per_device_train_batch_size={batch}",
               "gradient_accumulation_steps=1", "lora_r=64", "eval_size=0", "logging_steps=5",
               "save_steps=100000", "rationale=template", "max_length=2048", log=log)
    seconds = train_seconds(work / "adapter", wall)
    per_example = mean_tokens(model, train_records)
    result["sft"] = {"steps": steps, "batch": batch, "tokens_per_example": round(per_example, 1),
                     "seconds": round(seconds, 2), "wall_s": round(wall, 1),
                     "tokens_per_s": round(steps * batch * per_example / seconds, 1),
                     "bf16": cuda}

    cli(manifest, "merge-lora", work / "adapter", "-o", work / "merged", log=log)
    wall = cli(manifest, "predict", "--backend", "hf", "--model", work / "merged", "--data",
               work / "test.jsonl", "-o", work / "preds", "--batch-size", "32",
               "--max-new-tokens", new_tokens, f"min_new_tokens={new_tokens}", log=log)
    rate, tokens = generated_tokens_per_s(work / "preds" / "shard-0-of-1.jsonl")
    result["predict"] = {"prompts": prompts, "new_tokens_each": new_tokens, "tokens": tokens,
                         "tokens_per_s": round(rate, 1), "wall_s": round(wall, 1)}

    cli(manifest, "to-parquet", train, "-o", work / "rl-data", "--val-size", "0", log=log)
    wall = cli(manifest, "rl", "grpo", "--backend", "trl", "--model", work / "merged",
               "--data", work / "rl-data" / "train.parquet", "-o", work / "rl",
               f"trainer.total_training_steps={grpo_steps}", "data.train_batch_size=8",
               "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
               "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
               f"data.max_response_length={new_tokens}", "data.max_prompt_length=2048",
               log=log)
    seconds = train_seconds(work / "rl", wall)
    result["grpo"] = {"steps": grpo_steps, "prompts_per_step": 8, "answers_per_prompt": 4,
                      "max_response_tokens": new_tokens, "seconds": round(seconds, 2),
                      "steps_per_s": round(grpo_steps / seconds, 3), "wall_s": round(wall, 1)}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
