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

# The whole pipeline on scanpy's bundled PBMC set (700 cells, 10 types, one donor), on CPU, with
# the settings of configs/recipes/tiny-pbmc: baseline, a from-scratch model after SFT, and after
# GRPO, scored side by side on the same held-out puzzles (demo/score.json, .png, .html); then
# the held-out cells annotated as a new sample by the baseline and by the RL model (demo/annotate-*).
# One torch thread: same numbers on any machine, and no slower for a model this small.
PBMC = $$($(BIN)/python -c 'import pathlib, scanpy; print(pathlib.Path(scanpy.__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad")')
RECIPE := configs/recipes/tiny-pbmc
DEMO_CP := OMP_NUM_THREADS=1 $(CP)

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(DEMO_CP) build-context "$(PBMC)" -o $(DEMO)/cells --config $(RECIPE)/build-context.yaml
	$(DEMO_CP) make-qa -o $(DEMO)/puzzles --config $(RECIPE)/make-qa.yaml
	$(DEMO_CP) split -o $(DEMO)/splits --config $(RECIPE)/split.yaml
	$(DEMO_CP) predict --backend baseline -o $(DEMO)/preds-baseline
	$(DEMO_CP) init-model --tiny -o $(DEMO)/tiny-model --config $(RECIPE)/init-model.yaml
	$(DEMO_CP) sft -o $(DEMO)/sft-out --config $(RECIPE)/sft.yaml
	$(DEMO_CP) merge-lora -o $(DEMO)/sft-model
	$(DEMO_CP) predict --model $(DEMO)/sft-model -o $(DEMO)/preds-sft --config $(RECIPE)/predict.yaml
	$(DEMO_CP) to-parquet -o $(DEMO)/rl-data --config $(RECIPE)/to-parquet.yaml
	$(DEMO_CP) rl grpo -o $(DEMO)/rl-model --config $(RECIPE)/rl-grpo.yaml
	$(DEMO_CP) predict --model $(DEMO)/rl-model -o $(DEMO)/preds-rl --config $(RECIPE)/predict.yaml
	$(DEMO_CP) score $(DEMO)/preds-baseline $(DEMO)/preds-sft $(DEMO)/preds-rl \
	    --json $(DEMO)/score.json --plot $(DEMO)/score.png --html $(DEMO)/score.html
	# the last mile: the held-out cells as a new, unlabeled sample, annotated two ways
	$(BIN)/python $(RECIPE)/holdout.py "$(PBMC)" $(DEMO)/splits $(DEMO)/sample
	$(DEMO_CP) annotate $(DEMO)/sample/query.h5ad --reference $(DEMO)/sample/reference.h5ad \
	    -o $(DEMO)/annotate-baseline --config $(RECIPE)/annotate.yaml
	$(DEMO_CP) annotate $(DEMO)/sample/query.h5ad --backend hf --model $(DEMO)/rl-model \
	    -o $(DEMO)/annotate-rl --config $(RECIPE)/annotate.yaml
	$(DEMO_CP) manifest

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
