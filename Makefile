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
# The pretraining monitor's labelled sets (kNN and linear probe): fixed random subsets of each split
MONITOR_train ?= 1000
MONITOR_val   ?= 500
MONITOR    := monitor.train_shards=$(DEMO_DATA)/monitor-train monitor.val_shards=$(DEMO_DATA)/monitor-val
# One local process; `accelerate launch` with these flags asks nothing and warns about nothing.
# Without --num_cpu_threads_per_process accelerate sets OMP_NUM_THREADS=1: half of a 2-core CPU.
THREADS    ?= $(shell nproc)
LAUNCH     := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 \
              --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $(THREADS)
# `make experiment`: any labelled dataset with train/ and val/ class folders (a folder or an archive)
DATASET    ?= $(IMAGENETTE)
EXP_DATA   ?= $(if $(filter $(IMAGENETTE),$(DATASET)),$(DEMO_DATA),data/experiment)
EXP_RUNS   ?= runs/experiment
EXP_PRETRAIN_STEPS ?= 2000
EXP_FT_STEPS       ?= 300
SEEDS      ?= 0 1

.PHONY: setup test test-all demo experiment ablations bench clean

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

# The whole pipeline: MPP pretraining at 64 px (its encoder's kNN and linear-probe top-1 monitored
# on a labelled subset), fine-tuning of that encoder at 96 px (position embeddings 8x8 -> 12x12),
# the same fine-tuning from scratch, and the results table.
DEMO_SETS := $(foreach s,train val monitor-train monitor-val,$(DEMO_DATA)/$(s)/index.json)
demo: setup $(DEMO_SETS)
	rm -rf $(DEMO_RUNS)
	$(LAUNCH) pretrain/run.py data.shards=$(DEMO_DATA)/train eval.shards=$(DEMO_DATA)/val \
	    run.out_dir=$(DEMO_RUNS)/pretrain $(MONITOR)
	$(LAUNCH) finetune/run.py init_from=$(DEMO_RUNS)/pretrain/checkpoints/latest data.shards=$(DEMO_DATA)/train \
	    eval.shards=$(DEMO_DATA)/val run.out_dir=$(DEMO_RUNS)/pretrained
	$(LAUNCH) finetune/run.py init_from=null data.shards=$(DEMO_DATA)/train eval.shards=$(DEMO_DATA)/val \
	    run.out_dir=$(DEMO_RUNS)/scratch
	$(PY) -m vitcore.report pretrain=$(DEMO_RUNS)/pretrain pretrained=$(DEMO_RUNS)/pretrained \
	    scratch=$(DEMO_RUNS)/scratch --out $(DEMO_RUNS)/results

# The demo's pipeline with budgets that mean something (about 55 minutes on 2 CPU cores): longer
# pretraining, fine-tuning pretrained and from scratch for each seed, linear probes of the
# pretrained and of a randomly initialised encoder, the table and the README's figures.
EXP_SHARDS := data.shards=$(EXP_DATA)/train eval.shards=$(EXP_DATA)/val
FT := $(LAUNCH) finetune/run.py
PROBE := $(LAUNCH) finetune/run.py --config configs/finetune/linear_probe.yaml $(EXP_SHARDS)
experiment: setup $(foreach s,train val monitor-train monitor-val,$(EXP_DATA)/$(s)/index.json)
	rm -rf $(EXP_RUNS)
	$(LAUNCH) pretrain/run.py data.shards=$(EXP_DATA)/train eval.shards=$(EXP_DATA)/val \
	    run.out_dir=$(EXP_RUNS)/pretrain run.steps=$(EXP_PRETRAIN_STEPS) run.eval_every=500 \
	    monitor.train_shards=$(EXP_DATA)/monitor-train monitor.val_shards=$(EXP_DATA)/monitor-val
	for seed in $(SEEDS); do \
	  $(FT) $(EXP_SHARDS) init_from=$(EXP_RUNS)/pretrain run.out_dir=$(EXP_RUNS)/pretrained-s$$seed run.seed=$$seed \
	      run.steps=$(EXP_FT_STEPS) run.eval_every=100 || exit 1; \
	  $(FT) $(EXP_SHARDS) init_from=null run.out_dir=$(EXP_RUNS)/scratch-s$$seed run.seed=$$seed \
	      run.steps=$(EXP_FT_STEPS) run.eval_every=100 || exit 1; \
	done
	$(PROBE) init_from=$(EXP_RUNS)/pretrain run.out_dir=$(EXP_RUNS)/probe-pretrained
	$(PROBE) init_from=null run.out_dir=$(EXP_RUNS)/probe-random
	$(PY) -m vitcore.report pretrain=$(EXP_RUNS)/pretrain \
	    $(foreach s,$(SEEDS),pretrained-s$(s)=$(EXP_RUNS)/pretrained-s$(s) scratch-s$(s)=$(EXP_RUNS)/scratch-s$(s)) \
	    probe-pretrained=$(EXP_RUNS)/probe-pretrained probe-random=$(EXP_RUNS)/probe-random --out $(EXP_RUNS)/results
	$(PY) -m vitcore.plots --out $(EXP_RUNS)/figures pretrain=$(EXP_RUNS)/pretrain \
	    $(foreach s,$(SEEDS),pretrained-s$(s)=$(EXP_RUNS)/pretrained-s$(s) scratch-s$(s)=$(EXP_RUNS)/scratch-s$(s))

# The paper's ablation at the demo's budget (run `make demo` first: its runs are the reference):
# the corruption mix (100% [mask] instead of 80/10/10) and the target (4x4 sub-patch colours,
# L2 pixels instead of the 3-bit mean colour), each pretrained then fine-tuned like the demo.
ABLATIONS := mask100:mpp.mask_prob=1.0,mpp.random_prob=0.0,mpp.keep_prob=0.0 \
             downsampled:mpp.target=downsampled pixels:mpp.target=pixels,eval.shards=null
ablations: setup $(DEMO_DATA)/train/index.json $(DEMO_DATA)/val/index.json
	@test -f $(DEMO_RUNS)/scratch/summary.json || { echo "error: run make demo first (its runs are the reference)"; exit 1; }
	for ab in $(ABLATIONS); do \
	  name=$${ab%%:*}; args=$$(echo $${ab#*:} | tr , ' '); rm -rf $(DEMO_RUNS)/ablation-$$name; \
	  $(LAUNCH) pretrain/run.py data.shards=$(DEMO_DATA)/train eval.shards=$(DEMO_DATA)/val \
	      run.out_dir=$(DEMO_RUNS)/ablation-$$name/pretrain $$args || exit 1; \
	  $(LAUNCH) finetune/run.py init_from=$(DEMO_RUNS)/ablation-$$name/pretrain data.shards=$(DEMO_DATA)/train \
	      eval.shards=$(DEMO_DATA)/val run.out_dir=$(DEMO_RUNS)/ablation-$$name/finetune || exit 1; \
	done
	$(PY) -m vitcore.report "mean colour, 80/10/10 (demo)=$(DEMO_RUNS)/pretrained" \
	    $(foreach ab,$(ABLATIONS),$(firstword $(subst :, ,$(ab)))=$(DEMO_RUNS)/ablation-$(firstword $(subst :, ,$(ab)))/finetune) \
	    scratch=$(DEMO_RUNS)/scratch --out $(DEMO_RUNS)/ablations

# Shards pre-resized to 112 px (shorter side): decoding costs little next to training, and the
# 96 px fine-tuning crops still come from real pixels.
$(DEMO_DATA)/%/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(IMAGENETTE) --split $* --resize 112 --out $(DEMO_DATA)/$*

data/experiment/%/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(DATASET) --split $* --resize 112 --out data/experiment/$*

# The monitor's sets: the first MONITOR_<split> images of a seeded shuffle of the split (make picks
# these rules over the ones above: their stem is shorter)
$(DEMO_DATA)/monitor-%/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(IMAGENETTE) --split $* --resize 112 --limit $(MONITOR_$*) \
	    --out $(DEMO_DATA)/monitor-$*

data/experiment/monitor-%/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(DATASET) --split $* --resize 112 --limit $(MONITOR_$*) \
	    --out data/experiment/monitor-$*

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs data benchmarks/results .pytest_cache
