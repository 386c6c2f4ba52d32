# Every target creates (once) and reuses the virtual environment in .venv from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Demo data: a local Imagenette copy (folder or archive) if given, else the one beside the checkout.
IMAGENETTE ?= $(wildcard ../shared/data/imagenette2-224.tar)

.PHONY: setup test test-all demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

demo: setup
	@echo "make demo: not built yet (lands with the pretraining stage)"

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs data benchmarks/results .pytest_cache
