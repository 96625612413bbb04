# conceptdistill: `make demo` runs the whole method on the shapes world; `make test` runs the tests.
# Both create the virtual environment from nothing when it is missing (pinned by requirements.lock).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := $(PY) -m conceptdistill
EXPERIMENTS ?= shapes

.DEFAULT_GOAL := help
.PHONY: help install browser test test-slow demo reproduce world-model bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the pinned versions (only when missing or out of date)

# The report page test opens report/index.html in headless Chromium: installed from the system's packages when
# missing (as root, with apt-get); otherwise that test is skipped, or fails under CI=true.
browser:  ## headless Chromium and chromedriver for the report page test (apt-get, when missing and root)
	@if command -v chromedriver >/dev/null 2>&1 && { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else \
		echo "make browser: chromium/chromedriver missing and cannot install them here (needs root and apt-get);" \
			"the report page test will be skipped (or fail under CI=true)"; \
	fi

test: $(STAMP) browser  ## the default test run (slow tests excluded)
	$(PY) -m pytest

test-slow: $(STAMP)  ## only the slow tests (fine-tuning with DDP on two CPU processes)
	$(PY) -m pytest -m slow

demo: $(STAMP)  ## the whole method on the shapes world, on the CPU (rerun to resume)
	$(RUN) hydra.run.dir=runs/demo

reproduce: $(STAMP)  ## rerun the recorded experiments and refresh experiments/<name>/
	@for name in $(EXPERIMENTS); do \
		$(RUN) experiment=$$name hydra.run.dir=runs/reproduce/$$name logger=csv || exit 1; \
		$(PY) experiments/record_report.py runs/reproduce/$$name experiments/$$name || exit 1; \
	done

# WORLD_ARGS="world.init_from=packaged world.max_steps=0" measures the committed model again without training it.
world-model: $(STAMP)  ## retrain the shapes world's diffusion model into the package (WORLD_ARGS="trainer=gpu ...")
	$(RUN) stages=[world] hydra.run.dir=runs/world-model $(WORLD_ARGS)
	rm -rf conceptdistill/assets/shapes_world
	cp -r runs/world-model/world/pipeline conceptdistill/assets/shapes_world
	cp runs/world-model/world/samples_grid.png experiments/shapes/world_model_samples.png

# bench_peers.py runs DAAM in its own environment (.venv-daam, made by setup_daam.sh: DAAM pins an old diffusers).
bench: $(STAMP)  ## stage throughput, masks-stage peers (DAAM, reference code) and the passes curve, in experiments/benchmarks/
	$(PY) experiments/benchmarks/bench_stages.py
	experiments/benchmarks/setup_daam.sh
	$(PY) experiments/benchmarks/bench_peers.py
	$(PY) experiments/benchmarks/bench_passes.py

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check conceptdistill tests experiments

clean:  ## remove run folders (not the environment)
	rm -rf runs outputs multirun
