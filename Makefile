# cellpuzzle — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo
CP     := HF_HUB_OFFLINE=1 $(BIN)/cellpuzzle --manifest $(DEMO)/cellpuzzle.json

.PHONY: install test test-all demo bench lint clean

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

test-all: install  ## everything, slow tests included
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check cellpuzzle_cli tests bench

bench: install
	$(BIN)/python bench/bench_build_context.py

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(CP) build-context --pbmc -o $(DEMO)/cells
	$(CP) make-qa -o $(DEMO)/puzzles --seed 0
	$(CP) split -o $(DEMO)/splits --group-by cell --max-test 60 --seed 0
	$(CP) manifest

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
