# firekit: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: a CPU build of 2.13.0 is what the project is tested with.
# Elsewhere, point pip at a CPU wheel index (PIP_EXTRA_INDEX_URL) or set TORCH_SPEC to your build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.firekit-installed
DEMO_OUT ?= results
DEMO_DATA ?= data/demo
# `make demo TRAIN=1` retrains the 2D model from scratch (progress bar) instead of using the shipped one.
TRAIN ?=

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/firekit demo --data $(DEMO_DATA) --out $(DEMO_OUT) $(if $(TRAIN),--train)

# The browser test drives Debian's chromium (Playwright never downloads a browser here).
CHROMIUM ?= /usr/bin/chromium

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest

$(CHROMIUM):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

# firekit beside ANTs on the demo pairs (bench/results.md, .json, .png); 56 min on 2 cores. BENCH_ARGS="--ndims 2": 13 min.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m bench.vs_ants $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_DATA) .pytest_cache build *.egg-info
