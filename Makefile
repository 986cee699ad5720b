# Two commands for a fresh clone: `make run` (the pipeline) and `make test` (the tests).
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
PORT ?= 3000

.PHONY: setup data run test lint serve serve-champion bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The default dataset is generated, not downloaded: byte for byte what data.dvc records.
# `dvc commit` puts it in the local DVC cache (a fresh clone has no remote to pull from).
data: setup
	@if [ ! -d data ]; then python -m pipeline.datasets digits --out data && dvc commit --force --quiet data.dvc; fi

run: data
	dvc repro

test: setup
	python -m pytest

lint: setup
	ruff check .

serve: setup
	python -m serving.store import-export artifacts/export
	PORT=$(PORT) bentoml serve serving.service:Classifier --port $(PORT)

# The model promoted with `python -m pipeline.compare promote`, fetched from the MLflow registry.
serve-champion: setup
	python -m pipeline.compare export-champion --out artifacts/champion
	python -m serving.store import-export artifacts/champion
	SERVING_MODEL=champion bentoml serve serving.service:Classifier --port $(PORT)

# The CPU benchmarks; bench/serve.py needs the exported model (`make run` first).
# bench/gpu_check.py is for a CUDA machine and is run by hand.
bench: setup
	python bench/preprocess.py
	python bench/train.py
	python bench/inference.py
	@if [ -d artifacts/export ]; then python bench/serve.py; else echo "bench/serve.py skipped: no artifacts/export, run make run first"; fi

clean:
	rm -rf artifacts metrics plots mlflow.db

# The preprocess stage's decoded-image cache (hard links to the last runs' arrays plus an index;
# it keeps the 2 most recent parameter sets). Deleting it only makes the next run decode everything.
.PHONY: clean-cache
clean-cache:
	rm -rf .cache/preprocess
