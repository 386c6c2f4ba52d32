# Every target creates (once) and reuses the virtual environment in .venv from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Demo data: IMAGENETTE=<folder or archive> if given, else the copy beside the checkout, else
# the official fast.ai archive (downloaded once into data/).
IMAGENETTE ?= $(firstword $(wildcard ../shared/data/imagenette2-224.tar) \
                          https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz)
DEMO_DATA  ?= data/imagenette-112
DEMO_RUNS  ?= runs/demo
# One local process; `accelerate launch` with these flags asks nothing and warns about nothing.
LAUNCH     := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 \
              --mixed_precision no --dynamo_backend no

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

demo: setup $(DEMO_DATA)/train/index.json
	rm -rf $(DEMO_RUNS)/pretrain
	$(LAUNCH) pretrain/run.py data.shards=$(DEMO_DATA)/train run.out_dir=$(DEMO_RUNS)/pretrain
	$(PY) -m vitcore.report $(DEMO_RUNS)/pretrain

# Shards pre-resized to 112 px (shorter side): decoding costs little next to training, and the
# 96 px fine-tuning crops still come from real pixels.
$(DEMO_DATA)/%/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(IMAGENETTE) --split $* --resize 112 --out $(DEMO_DATA)/$*

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs data benchmarks/results .pytest_cache
