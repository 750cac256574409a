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

# Debian packages the tests need, installed when missing: chromium for the browser test (Playwright
# never downloads a browser here), Xvfb and Mesa with Qt's X libraries for napari's rendered tests,
# insighttoolkit5-examples for its real T1 head (tests/test_real_heads.py, bench/real_heads.py).
SYSTEM_PACKAGES ?= chromium xvfb libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-cursor0 \
	libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 \
	libxcb-xfixes0 libxcb-xkb1 libfontconfig1 libdbus-1-3 insighttoolkit5-examples
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

test: $(STAMP) system-packages
	$(PY) -m pytest

.PHONY: system-packages
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# firekit beside ANTs, Greedy, elastix and ConvexAdam on the demo pairs (bench/results.md, .json, .png); without
# the peers 56 min on 2 cores; the peers add about 6 min per 40 2D pairs and 5 min per 3D pair at one thread.
# BENCH_ARGS="--ndims 2": the 2D part alone.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m bench.vs_ants $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_DATA) .pytest_cache build *.egg-info
