# cellpuzzle — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo
CP     := HF_HUB_OFFLINE=1 $(BIN)/cellpuzzle --manifest $(DEMO)/cellpuzzle.json

.PHONY: install test test-all test-verl-cpu demo bench lint clean

# torch first, from the local CPU wheel: an unpinned torch would pull gigabytes of CUDA.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: install  ## fast suite (slow tests excluded)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -q

# verl's real trainer on CPU (rl --device cpu): GRPO 2 steps, PPO 1 step, the reward canary.
# About 5 minutes on 2 cores; each run has a hard timeout and its own process session.
test-verl-cpu: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow -q tests/test_rl_verl_cpu.py

test-all: install  ## everything, slow tests included
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check cellpuzzle_cli tests bench

bench: install
	$(BIN)/python bench/bench_build_context.py
	$(BIN)/python bench/bench_make_qa.py
	$(BIN)/python bench/bench_score.py
	$(BIN)/python bench/bench_predict.py

# The whole pipeline on scanpy's bundled PBMC set (700 cells, 10 types, one donor), on CPU.
PBMC = $$($(BIN)/python -c 'import pathlib, scanpy; print(pathlib.Path(scanpy.__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad")')

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(CP) build-context "$(PBMC)" -o $(DEMO)/cells --cell-type-col bulk_labels --top-genes 20
	$(CP) make-qa -o $(DEMO)/puzzles --min-n 3 --max-n 10 --per-n 40 --test-cells 0.2 --seed 0
	$(CP) split -o $(DEMO)/splits --group-by cell --seed 0
	$(CP) predict --backend baseline -o $(DEMO)/preds-baseline
	$(CP) score $(DEMO)/preds-baseline
	$(CP) init-model --tiny -o $(DEMO)/tiny-model --seed 0
	$(CP) sft -o $(DEMO)/adapter max_steps=150 lora_r=64 learning_rate=3e-3 \
	    per_device_train_batch_size=4 gradient_accumulation_steps=1 eval_size=0 \
	    logging_steps=10 'modules_to_save=[embed_tokens]'
	$(CP) merge-lora -o $(DEMO)/sft-model
	$(CP) to-parquet -o $(DEMO)/rl-data --val-size 0.1 --seed 0
	$(CP) rl grpo --backend trl -o $(DEMO)/rl-model trainer.total_training_steps=3 \
	    data.train_batch_size=2 actor_rollout_ref.rollout.n=4 \
	    actor_rollout_ref.actor.ppo_mini_batch_size=2 \
	    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 data.max_response_length=64
	$(CP) predict --backend hf --model $(DEMO)/rl-model -o $(DEMO)/preds-rl --max-new-tokens 256
	$(CP) score $(DEMO)/preds-baseline $(DEMO)/preds-rl --json $(DEMO)/score.json --plot $(DEMO)/score.png
	$(CP) manifest

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
