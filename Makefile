# Two commands on a fresh machine: `make run` (the main job on the embedded sample data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FP     := $(BIN)/finderpartner
RUN    := outputs/clip_tiny
PROMPT ?= a large red circle on the left

.PHONY: run test test-optimum lint install install-dev sample train eval search bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps: reinstall when pyproject.toml changes. `run` needs the package and FAISS; `test` needs every extra.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[index]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed-run

install: $(VENV)/.installed-run
install-dev: $(VENV)/.installed-dev

sample: install
	$(FP) sample-data --out data/sample

train: sample
	$(FP) train --config configs/clip_tiny.yaml --resume auto

eval: install
	$(FP) eval --model $(RUN)/best_model --data data/sample --split val

search: install
	$(FP) search --model $(RUN)/best_model --images data/sample/images/val --prompt "$(PROMPT)" --top-k 5

# The main job: sample data -> train the tiny model -> evaluate -> a text search over the val images.
run: train eval search

# Lint first (seconds): ruff's checks and formatting, configured in pyproject.toml.
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

# The ONNX export loaded by Hugging Face optimum (tests/test_export_optimum.py; skipped by `make test`).
# optimum-onnx needs transformers < 4.58, so it gets an environment of its own beside the main one.
OPTIMUM_VENV ?= .venv-optimum
$(OPTIMUM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install --quiet --upgrade pip
	$(OPTIMUM_VENV)/bin/pip install --quiet -e ".[optimum]" "pytest>=7.4" "pytest-timeout>=2.2"
	touch $@

test-optimum: $(OPTIMUM_VENV)/.installed
	$(OPTIMUM_VENV)/bin/python -m pytest -q tests/test_export_optimum.py

bench: install-dev
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf outputs data/sample
