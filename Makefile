# Two commands from a fresh clone:  make demo   and   make test
# Both create .venv, install what they need (torch/torchvision pinned in
# requirements/constraints.txt) and run headless under Xvfb when there is no display.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
PEERS  := .venv-peers
# Run napari under a virtual X server unless a real display is available.
XRUN   := $(if $(DISPLAY),,xvfb-run -a -s "-screen 0 1600x1200x24")

.PHONY: demo test bench bench-peers lint clean system-deps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[testing]"
	touch $@

system-deps:
	@bash scripts/system-deps.sh

demo: $(VENV)/.installed system-deps
	$(XRUN) $(PY) -m napari_lnmeta._napari.demo --out out/demo

test: $(VENV)/.installed system-deps
	$(XRUN) $(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# every benchmark, the TIAToolbox side by side included (its venv is built once)
bench: $(VENV)/.installed $(PEERS)/.installed system-deps
	$(XRUN) $(PY) benchmarks/run_all.py $(BENCH_ARGS)

# TIAToolbox side by side (benchmarks/peers_tiatoolbox.py). TIAToolbox pins zarr 2 and
# numpy 1.x, so it gets its own venv; torch/torchvision come from the same constraints, and
# setuptools < 70 (pkg_resources) is installed after it.
$(PEERS)/.installed: $(CONSTRAINTS)
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q -c $(CONSTRAINTS) torch torchvision tiatoolbox==1.3.2 openslide-bin
	$(PEERS)/bin/python -m pip install -q "setuptools<70"
	touch $@

bench-peers: $(VENV)/.installed $(PEERS)/.installed system-deps
	$(PY) benchmarks/peers_tiatoolbox.py --peer-python $(PEERS)/bin/python

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) $(PEERS) out .pytest_cache
