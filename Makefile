# Two commands from a fresh clone:  make demo   and   make test
# Both create .venv, install what they need (torch/torchvision pinned in
# requirements/constraints.txt) and run headless under Xvfb when there is no display.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
# Run napari under a virtual X server unless a real display is available.
XRUN   := $(if $(DISPLAY),,xvfb-run -a -s "-screen 0 1600x1200x24")

.PHONY: demo test bench lint clean system-deps

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

bench: $(VENV)/.installed system-deps
	$(XRUN) $(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) out .pytest_cache
