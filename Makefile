# Two commands for a fresh clone: `make run` (the pipeline) and `make test` (the tests).
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
PORT ?= 3000
# No usage tracking from anything this Makefile starts (BentoML, MLflow, DVC, and tools honouring
# DO_NOT_TRACK).
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := true

.PHONY: setup data run plots test lint serve serve-champion bench clean mlflow-server monitor

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "make setup: a virtual environment in $(VENV) with this project and its dependencies (pyproject.toml):"
	@echo "  torch + torchvision from PyPI, which bundle NVIDIA's CUDA libraries (~4.5 GB; no GPU is needed,"
	@echo "  everything runs on the CPU), onnxruntime-gpu (~0.35 GB), mlflow, dvc, bentoml, scikit-learn,"
	@echo "  matplotlib, pytest, playwright: about 7 GB on disk, a few minutes (pip shows its progress). Once only."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on --upgrade pip
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	touch $@

# With a default DVC remote (a team's), a fresh clone pulls the data and every stage output it
# holds, so `dvc repro` only runs what the remote lacks. Without one, the default dataset is
# generated, not downloaded: byte for byte what data.dvc records, and `dvc commit` puts it in the
# local DVC cache.
data: setup
	@if [ ! -d data ] && dvc remote default >/dev/null 2>&1; then \
		echo "pulling data and stage outputs from DVC remote '$$(dvc remote default)'"; \
		dvc pull --allow-missing || echo "dvc pull failed; generating the data instead"; fi
	@if [ ! -d data ]; then python -m pipeline.datasets digits --out data && dvc commit --force --quiet data.dvc; fi

# A local MLflow tracking server to try the team setup (README, "Scaling past one machine"):
# SQLite backend, artifacts proxied by the server into $(MLFLOW_HOME)/artifacts. Then, in
# another shell: export MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)
MLFLOW_PORT ?= 5000
MLFLOW_HOME ?= .mlflow-server
mlflow-server: setup
	mkdir -p $(MLFLOW_HOME)
	mlflow server --backend-store-uri sqlite:///$(abspath $(MLFLOW_HOME))/mlflow.db \
		--artifacts-destination $(abspath $(MLFLOW_HOME))/artifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

# DVC ends every repro with "Use `dvc push` to send your updates to remote storage."; without a
# remote there is nowhere to push, so that line is dropped (DVC has no setting for it).
# --line-buffered: piped into a log, each "Running stage" header still arrives when it is printed.
run: data
	@if [ -n "$$(dvc remote list)" ]; then dvc repro; \
	else PYTHONUNBUFFERED=1 bash -o pipefail -c 'dvc repro | grep --line-buffered -v "^Use .dvc push. to send"'; fi

# `dvc plots show` with vega, vega-lite and vega-embed inlined (bin/plots fetches them once with
# `npm pack`): DVC's own page loads them from a CDN and is blank offline. Writes dvc_plots/index.html.
plots: setup
	bin/plots show

# One pytest worker per CPU (at most 4), whole files per worker: most tests wait on subprocesses
# (dvc, servers, browsers), so 2 cores run the suite in about half the time. PYTEST_PARALLEL= runs it serially.
PYTEST_PARALLEL ?= -n auto --maxprocesses 4 --dist loadfile
test: setup
	python -m pytest $(PYTEST_PARALLEL) --durations=15

# The fast tier: everything but the end-to-end tests marked slow; under 2 minutes on 2 cores.
.PHONY: test-fast
test-fast: setup
	python -m pytest $(PYTEST_PARALLEL) -m "not slow" --durations=10

lint: setup
	ruff check .

# The champion from the MLflow registry if one was promoted, else the latest export; it says which.
# Importing a deployable the store already holds reuses it. The web UI: http://localhost:$(PORT)/
# `python -m pipeline.serve` runs nginx (the HTTP front, serving/front/nginx.conf; Debian package
# nginx) on PORT in front of `bentoml serve` on a loopback port; Ctrl-C stops both. Its limits are
# FRONT_* variables (docs/deployment.md; `python -m pipeline.serve --limits` prints them).
serve: setup
	@python -m pipeline.serve --check
	@dir=$$(python -m pipeline.compare serve-source --champion-out artifacts/champion --export artifacts/export) \
	&& alias=$$(if [ "$$dir" = artifacts/champion ]; then echo champion; fi) \
	&& tag=$$(python -m serving.store import-export "$$dir" --alias "$$alias") \
	&& echo "model store: $$tag; web UI on http://localhost:$(PORT)/" \
	&& SERVING_MODEL=$$tag python -m pipeline.serve --port $(PORT)

# The model promoted with `python -m pipeline.compare promote`, fetched from the MLflow registry
# (both ONNX files and the card of one model version) and served by its exact store tag.
serve-champion: setup
	@python -m pipeline.serve --check
	python -m pipeline.compare export-champion --out artifacts/champion
	tag=$$(python -m serving.store import-export artifacts/champion --alias champion) && \
	echo "serving $$tag (the MLflow champion)" && \
	SERVING_MODEL=$$tag python -m pipeline.serve --port $(PORT)

# Drift of the served model's last 300 logged predictions against its reference (docs/monitoring.md):
# a table and a verdict; artifacts/monitor/drift.json and report.html; an MLflow run. Exit 3 on drift.
SERVING_LOG_DIR ?= artifacts/predictions
monitor: setup
	python -m pipeline.monitor --log $(SERVING_LOG_DIR) --model artifacts/export --last 300 \
		--out artifacts/monitor --fail-on-drift

# The CPU benchmarks; bench/serve.py needs the exported model (`make run` first), nginx (it
# measures the service through the front, as `make serve` runs it) and, for its load generator,
# h2load (Debian's nghttp2-client; .ci/run installs it; without it, slower Python clients).
# bench/gpu_check.py is for a CUDA machine and is run by hand.
bench: setup
	python bench/preprocess.py
	python bench/train.py
	python bench/inference.py
	@if [ -d artifacts/export ]; then python bench/serve.py; else echo "bench/serve.py skipped: no artifacts/export, run make run first"; fi

# Our service against TorchServe 0.12 serving the same LeNet-5 weights (issue 18; docs/deployment.md):
# needs `make run` first and nginx. TorchServe goes into its own environment, .venv-torchserve
# (bench/torchserve/setup.sh: torchserve, torch-model-archiver, torch with its CUDA wheels, ~5.5 GB;
# Debian's openjdk-17-jre-headless when `java` is missing). Options: TORCHSERVE_BENCH_ARGS="--duration 2".
TORCHSERVE_BENCH_ARGS ?=
.PHONY: torchserve-bench
torchserve-bench: setup
	bash bench/torchserve/setup.sh
	python bench/torchserve_compare.py $(TORCHSERVE_BENCH_ARGS)

# Generated, untracked outputs only: metrics/ and plots/ are tracked in git and stay.
clean:
	rm -rf artifacts dvc_plots mlflow.db mlflow.db.lock

# The preprocess stage's decoded-image cache (hard links to the last runs' arrays plus an index;
# it keeps the 2 most recent parameter sets). Deleting it only makes the next run decode everything.
.PHONY: clean-cache
clean-cache:
	rm -rf .cache/preprocess
