# Two commands on a fresh machine: `make run` (the main job on the embedded sample data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FP     := $(BIN)/finderpartner
RUN    := outputs/clip_tiny

.PHONY: run test install sample train eval search bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp is newer than pyproject.toml once the package and its extras are installed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

sample: install
	$(FP) sample-data --out data/sample

train: sample
	$(FP) train --config configs/clip_tiny.yaml --resume auto

eval: install
	$(FP) eval --model $(RUN)/best_model --data data/sample --split val

search: install
	$(FP) search --model $(RUN)/best_model --images data/sample/images/val --prompt "a large red circle on the left" --top-k 5

# The main job: sample data -> train the tiny model -> evaluate -> a text search over the val images.
run: train eval search

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf outputs data/sample
