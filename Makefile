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
	$(MAKE) test-optimum

# The ONNX export loaded by Hugging Face optimum (tests/test_export_optimum.py, which the plain pytest run skips).
# optimum-onnx needs transformers < 4.58 and this venv has transformers 5, so the test runs with an overlay put in
# front of the venv: transformers 4.57 and optimum (pure Python, pinned, no dependencies resolved), reusing the venv's
# torch and onnxruntime. About 10 s to install; a venv of its own would install torch again (5.9 GB, minutes).
OPTIMUM_OVERLAY ?= $(VENV)/optimum-overlay
OPTIMUM_PINS := transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 optimum==2.1.0 optimum-onnx==0.1.0 \
                requests urllib3 charset-normalizer
$(OPTIMUM_OVERLAY)/.installed: $(VENV)/.installed-dev
	$(BIN)/pip install --quiet --no-deps --target $(OPTIMUM_OVERLAY) $(OPTIMUM_PINS)
	touch $@

test-optimum: $(OPTIMUM_OVERLAY)/.installed
	PYTHONPATH=$(OPTIMUM_OVERLAY) FINDERPARTNER_REQUIRE_OPTIMUM=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_export_optimum.py

bench: install-dev
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf outputs data/sample
