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
launch_on   = $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 \
              --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $(1)
LAUNCH     := $(call launch_on,$(THREADS))
# `make experiment` and `make pretrain-curve` run their many fine-tunings EXP_JOBS at a time, each
# on THREADS/EXP_JOBS threads: on 2 cores two single-threaded runs side by side do more work than
# one run on both threads (benchmarks/scaling.py --independent; docs/benchmarks.md). A run's data
# order and initialisation do not depend on it (its data workers are the recipe's), only the order
# of floating-point sums across threads. Each run's console goes to <run>.log. EXP_JOBS=1: one run
# at a time on every thread.
EXP_JOBS   ?= 2
EXP_LAUNCH := $(call launch_on,$(shell echo $$(( $(THREADS) / $(EXP_JOBS) > 1 ? $(THREADS) / $(EXP_JOBS) : 1 ))))
# `make experiment`: any labelled dataset with train/ and val/ class folders (a folder or an archive)
DATASET    ?= $(IMAGENETTE)
EXP_DATA   ?= $(if $(filter $(IMAGENETTE),$(DATASET)),$(DEMO_DATA),data/experiment)
EXP_RUNS   ?= runs/experiment
EXP_DOCS   ?= docs
EXP_PRETRAIN_STEPS ?= 1000
EXP_FT_SIZE        ?= 64
EXP_FT_STEPS       ?= 1000
EXP_FT10_STEPS     ?= 300
EXP_EVAL_EVERY     ?= 250
EXP_PER_CLASS      ?= 95
SEEDS      ?= 0 1 2

.PHONY: setup test test-all demo experiment pretrain-curve sweep ablations bench clean

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

# The whole pipeline: MPP pretraining at 48 px (its encoder's kNN and linear-probe top-1 monitored
# on a labelled subset), fine-tuning of that encoder at 64 px (position embeddings 6x6 -> 8x8), the
# same fine-tuning from scratch with the same total training compute (pretraining + fine-tuning
# FLOPs: more steps), and the results table.
DEMO_SETS := $(foreach s,train val monitor-train monitor-val,$(DEMO_DATA)/$(s)/index.json)
DEMO_FT   := $(LAUNCH) finetune/run.py data.shards=$(DEMO_DATA)/train eval.shards=$(DEMO_DATA)/val
demo: setup $(DEMO_SETS)
	rm -rf $(DEMO_RUNS)
	$(LAUNCH) pretrain/run.py data.shards=$(DEMO_DATA)/train eval.shards=$(DEMO_DATA)/val \
	    run.out_dir=$(DEMO_RUNS)/pretrain $(MONITOR)
	$(DEMO_FT) init_from=$(DEMO_RUNS)/pretrain/checkpoints/latest run.out_dir=$(DEMO_RUNS)/pretrained
	$(DEMO_FT) init_from=null run.out_dir=$(DEMO_RUNS)/scratch_same_compute \
	    run.steps=$$($(PY) -m finetune.compare steps $(DEMO_RUNS)/pretrain $(DEMO_RUNS)/pretrained)
	$(PY) -m vitcore.report pretrain=$(DEMO_RUNS)/pretrain pretrained=$(DEMO_RUNS)/pretrained \
	    scratch_same_compute=$(DEMO_RUNS)/scratch_same_compute --gain pretrained,scratch_same_compute \
	    --out $(DEMO_RUNS)/results

# `make experiment`: does MPP pretraining help, at a budget that means something (3 seeds, the
# default, took 105 minutes on 2 CPU cores with EXP_JOBS=2; seeds after the first evaluate only at
# the end)? One MPP pretraining at 48 px on every training image (labels unused), then for each
# seed (SEEDS) and each label regime (all labels; a class-balanced 10%), fine-tuning at 64 px from
# that encoder, from scratch with the same fine-tuning steps, and from scratch with the same total
# training compute (pretraining + fine-tuning FLOPs), plus linear probes of the MPP and of a random
# encoder; then the results table, the compute figure and docs/experiment-results.json. The
# learning rates, warmups and layer decays are `make sweep`'s choices (configs/finetune/experiment_*.yaml).
EXP_SHARDS := data.shards=$(EXP_DATA)/train eval.shards=$(EXP_DATA)/val
EXP_10PCT  := data.shards=$(EXP_DATA)/train-10pct eval.shards=$(EXP_DATA)/val
EXP_FT     = $(EXP_LAUNCH) finetune/run.py --config configs/finetune/experiment_$(1).yaml model.image_size=$(EXP_FT_SIZE)
PROBE := $(EXP_LAUNCH) finetune/run.py --config configs/finetune/linear_probe.yaml $(EXP_SHARDS) model.image_size=$(EXP_FT_SIZE)
MATCH := $(PY) -m finetune.compare steps
EXP_SETS := $(foreach s,train val train-10pct monitor-train monitor-val,$(EXP_DATA)/$(s)/index.json)

# One fine-tuning of the experiment or the curve, in a rule whose target is <run>/summary.json: the
# command $(1) with its run.out_dir, its console in <run>.log, whose end is shown if it fails.
define ft_run
@mkdir -p $(dir $(@D)) && echo "$(@D): started (log: $(@D).log)"
@$(1) run.out_dir=$(@D) > $(@D).log 2>&1 || { tail -n 30 $(@D).log; echo "error: $(@D) failed (log: $(@D).log)"; exit 1; }
@echo "$(@D): finished"
endef
# Nothing here is an intermediate file for make to delete: a run's summary.json is its result
.SECONDARY:

# The pretraining is kept between runs of `make experiment` (and shared with `make sweep`): delete
# $(EXP_RUNS)/pretrain to redo it.
$(EXP_RUNS)/pretrain/summary.json: | setup $(EXP_SETS)
	$(LAUNCH) pretrain/run.py data.shards=$(EXP_DATA)/train eval.shards=$(EXP_DATA)/val \
	    run.out_dir=$(EXP_RUNS)/pretrain run.steps=$(EXP_PRETRAIN_STEPS) run.eval_every=500 \
	    monitor.train_shards=$(EXP_DATA)/monitor-train monitor.val_shards=$(EXP_DATA)/monitor-val monitor.every=250

# The experiment's runs, one rule per regime and arm, the seed the stem. Seeds after the first
# evaluate only at the end; scratch_same_compute waits for the pretrained run whose compute it matches.
EXP_SEED = run.seed=$* run.eval_every=$(if $(filter $*,$(firstword $(SEEDS))),$(EXP_EVAL_EVERY),0)
$(EXP_RUNS)/pretrained-s%/summary.json: $(EXP_RUNS)/pretrain/summary.json
	$(call ft_run,$(call EXP_FT,pretrained) $(EXP_SHARDS) init_from=$(EXP_RUNS)/pretrain run.steps=$(EXP_FT_STEPS) $(EXP_SEED))
$(EXP_RUNS)/scratch-s%/summary.json:
	$(call ft_run,$(call EXP_FT,scratch) $(EXP_SHARDS) init_from=null run.steps=$(EXP_FT_STEPS) $(EXP_SEED))
$(EXP_RUNS)/scratch_same_compute-s%/summary.json: $(EXP_RUNS)/pretrained-s%/summary.json
	$(call ft_run,steps=$$($(MATCH) $(EXP_RUNS)/pretrain $(<D)) && \
	    $(call EXP_FT,scratch) $(EXP_SHARDS) init_from=null run.steps=$$steps $(EXP_SEED))
$(EXP_RUNS)/labels_10pct/pretrained-s%/summary.json: $(EXP_RUNS)/pretrain/summary.json
	$(call ft_run,$(call EXP_FT,pretrained) $(EXP_10PCT) init_from=$(EXP_RUNS)/pretrain run.steps=$(EXP_FT10_STEPS) $(EXP_SEED))
$(EXP_RUNS)/labels_10pct/scratch-s%/summary.json:
	$(call ft_run,$(call EXP_FT,scratch) $(EXP_10PCT) init_from=null run.steps=$(EXP_FT10_STEPS) $(EXP_SEED))
$(EXP_RUNS)/labels_10pct/scratch_same_compute-s%/summary.json: $(EXP_RUNS)/labels_10pct/pretrained-s%/summary.json
	$(call ft_run,steps=$$($(MATCH) $(EXP_RUNS)/pretrain $(<D)) && \
	    $(call EXP_FT,scratch) $(EXP_10PCT) init_from=null run.steps=$$steps $(EXP_SEED))
$(EXP_RUNS)/probe-pretrained/summary.json: $(EXP_RUNS)/pretrain/summary.json
	$(call ft_run,$(PROBE) init_from=$(EXP_RUNS)/pretrain)
$(EXP_RUNS)/probe-random/summary.json:
	$(call ft_run,$(PROBE) init_from=null)
# The longest runs listed first, so that the two job slots end close together. make starts a goal whose
# prerequisite is still running after the rest of the list: at 3 seeds two scratch_same_compute runs
# (1,550 steps) ran last, side by side, which ends the slots together too.
EXP_ALL = $(foreach dir,$(EXP_RUNS) $(EXP_RUNS)/labels_10pct,$(foreach arm,pretrained scratch_same_compute scratch,\
            $(foreach seed,$(SEEDS),$(dir)/$(arm)-s$(seed)/summary.json))) \
          $(EXP_RUNS)/probe-pretrained/summary.json $(EXP_RUNS)/probe-random/summary.json

experiment: setup $(EXP_SETS) $(EXP_RUNS)/pretrain/summary.json
	rm -rf $(filter-out $(EXP_RUNS)/pretrain,$(wildcard $(EXP_RUNS)/*))
	$(MAKE) --no-print-directory -j$(EXP_JOBS) $(EXP_ALL)
	$(PY) -m finetune.compare results $(EXP_RUNS) --seeds $(SEEDS) --out $(EXP_RUNS)/results
	cp $(EXP_RUNS)/results.json $(EXP_DOCS)/experiment-results.json
	cp $(EXP_RUNS)/figures/compute.png $(EXP_DOCS)/figures/experiment_compute.png
	$(PY) -m vitcore.report.plots --out $(EXP_RUNS)/figures pretrain=$(EXP_RUNS)/pretrain \
	    $(foreach s,$(SEEDS),pretrained-s$(s)=$(EXP_RUNS)/pretrained-s$(s) scratch_same_compute-s$(s)=$(EXP_RUNS)/scratch_same_compute-s$(s))
	cp $(EXP_RUNS)/figures/probes.png $(EXP_DOCS)/figures/experiment_probes.png
	cp $(EXP_RUNS)/figures/training_curves.png $(EXP_RUNS)/figures/val_top1.png \
	    $(EXP_RUNS)/figures/pretrain_mpp_predictions.png $(EXP_DOCS)/figures/
	cp $(EXP_RUNS)/figures/pretrained-s$(firstword $(SEEDS))_val_confusion.png $(EXP_DOCS)/figures/experiment_confusion.png

# `make pretrain-curve`: how much pretraining pays. One MPP pretraining 4x as long as the
# experiment's, its checkpoints kept at 1/4, 1/2 and the end, plus the one the monitor's linear
# probe picks (checkpoints/best, when it is another); each fine-tuned like the experiment's
# pretrained arm and against scratch with the same total compute (a run of its own: a longer
# run's intermediate evaluation has another lr schedule), with all labels and with 10% of them,
# seed 0; then the table, docs/pretrain-curve-results.json and docs/figures/pretrain_curve.png.
# It took 150 minutes on 2 CPU cores with EXP_JOBS=2 (the pretraining 20 of them).
CURVE_RUNS  ?= runs/pretrain-curve
CURVE_DOCS  ?= docs
CURVE_STEPS ?= $(shell echo $$((4 * $(EXP_PRETRAIN_STEPS))))
CURVE_CKPTS  = $(foreach part,4 2 1,$(shell printf 'step-%08d' $$(($(CURVE_STEPS) / $(part)))))
CURVE_LONGEST_FIRST = $(foreach part,1 2 4,$(shell printf 'step-%08d' $$(($(CURVE_STEPS) / $(part)))))
$(CURVE_RUNS)/pretrain/summary.json: | setup $(EXP_SETS)
	$(LAUNCH) pretrain/run.py $(EXP_SHARDS) run.out_dir=$(CURVE_RUNS)/pretrain run.steps=$(CURVE_STEPS) \
	    run.ckpt_every=$$(($(CURVE_STEPS) / 4)) run.keep_last=4 run.eval_every=$$(($(CURVE_STEPS) / 4)) \
	    monitor.train_shards=$(EXP_DATA)/monitor-train monitor.val_shards=$(EXP_DATA)/monitor-val monitor.every=250 \
	    run.best_metric=probe/linear_top1_cls

# The curve's runs, one rule per regime and arm, the point (a checkpoint's name) the stem
CURVE_CKPT = $(CURVE_RUNS)/pretrain/checkpoints/$*
$(CURVE_RUNS)/points/%/all/pretrained/summary.json:
	$(call ft_run,$(call EXP_FT,pretrained) $(EXP_SHARDS) init_from=$(CURVE_CKPT) run.steps=$(EXP_FT_STEPS) run.eval_every=0)
$(CURVE_RUNS)/points/%/all/scratch_same_compute/summary.json: $(CURVE_RUNS)/points/%/all/pretrained/summary.json
	$(call ft_run,steps=$$($(MATCH) $(CURVE_CKPT) $(<D)) && \
	    $(call EXP_FT,scratch) $(EXP_SHARDS) init_from=null run.steps=$$steps run.eval_every=0)
$(CURVE_RUNS)/points/%/labels_10pct/pretrained/summary.json:
	$(call ft_run,$(call EXP_FT,pretrained) $(EXP_10PCT) init_from=$(CURVE_CKPT) run.steps=$(EXP_FT10_STEPS) run.eval_every=0)
$(CURVE_RUNS)/points/%/labels_10pct/scratch_same_compute/summary.json: $(CURVE_RUNS)/points/%/labels_10pct/pretrained/summary.json
	$(call ft_run,steps=$$($(MATCH) $(CURVE_CKPT) $(<D)) && \
	    $(call EXP_FT,scratch) $(EXP_10PCT) init_from=null run.steps=$$steps run.eval_every=0)

# The points: the kept checkpoints, the longest pretraining (the longest matched runs) first, and
# `best` when the probe picked another
pretrain-curve: setup $(EXP_SETS) $(CURVE_RUNS)/pretrain/summary.json
	rm -rf $(CURVE_RUNS)/points
	best=$$(basename $$(readlink -f $(CURVE_RUNS)/pretrain/checkpoints/best)); \
	points="$$(echo " $(CURVE_CKPTS) " | grep -q " $$best " || echo best) $(CURVE_LONGEST_FIRST)"; \
	$(MAKE) --no-print-directory -j$(EXP_JOBS) $$(for p in $$points; do for r in all labels_10pct; do \
	  for arm in pretrained scratch_same_compute; do echo $(CURVE_RUNS)/points/$$p/$$r/$$arm/summary.json; done; done; done)
	$(PY) -m finetune.curve $(CURVE_RUNS) --out $(CURVE_RUNS)/results
	cp $(CURVE_RUNS)/results.json $(CURVE_DOCS)/pretrain-curve-results.json
	cp $(CURVE_RUNS)/figures/pretrain_curve.png $(CURVE_DOCS)/figures/pretrain_curve.png

# The search behind the experiment's recipes, the same for both arms (finetune/sweep.py): peak lr
# until the choice is interior, then warmup, then layer-wise lr decay, each arm at its horizon in
# the experiment (times SWEEP_FRACTION), trained on the training images minus a held-out 1,000 and
# scored on those 1,000 (never on the validation set the results report). Half of each horizon by
# default: at the full one the sweep's 14 or more runs of 1,000 and about 1,550 steps take 150 to 190
# minutes on 2 cores, over the 150 minutes it is given; SWEEP_FRACTION=1 runs the full horizons.
SWEEP_RUNS     ?= runs/sweep
SWEEP_FRACTION ?= 0.5
SWEEP_DOCS     ?= docs
sweep: setup $(EXP_DATA)/sweep-train/index.json $(EXP_DATA)/sweep-holdout/index.json $(EXP_RUNS)/pretrain/summary.json
	$(PY) -m finetune.sweep --train $(EXP_DATA)/sweep-train --holdout $(EXP_DATA)/sweep-holdout \
	    --pretrained $(EXP_RUNS)/pretrain --steps $(EXP_FT_STEPS) --image-size $(EXP_FT_SIZE) \
	    --fraction $(SWEEP_FRACTION) --out $(SWEEP_RUNS) --launch "$(LAUNCH)"
	cp $(SWEEP_RUNS)/results.json $(SWEEP_DOCS)/sweep-results.json

# The paper's ablation at the demo's budget (run `make demo` first: its runs are the reference):
# the corruption mix (100% [mask] instead of 80/10/10) and the target (4x4 sub-patch colours,
# L2 pixels instead of the 3-bit mean colour), each pretrained then fine-tuned like the demo.
ABLATIONS := mask100:mpp.mask_prob=1.0,mpp.random_prob=0.0,mpp.keep_prob=0.0 \
             downsampled:mpp.target=downsampled pixels:mpp.target=pixels,eval.shards=null
ablations: setup $(DEMO_DATA)/train/index.json $(DEMO_DATA)/val/index.json
	@test -f $(DEMO_RUNS)/scratch_same_compute/summary.json || { echo "error: run make demo first (its runs are the reference)"; exit 1; }
	for ab in $(ABLATIONS); do \
	  name=$${ab%%:*}; args=$$(echo $${ab#*:} | tr , ' '); rm -rf $(DEMO_RUNS)/ablation-$$name; \
	  $(LAUNCH) pretrain/run.py data.shards=$(DEMO_DATA)/train eval.shards=$(DEMO_DATA)/val \
	      run.out_dir=$(DEMO_RUNS)/ablation-$$name/pretrain $$args || exit 1; \
	  $(LAUNCH) finetune/run.py init_from=$(DEMO_RUNS)/ablation-$$name/pretrain data.shards=$(DEMO_DATA)/train \
	      eval.shards=$(DEMO_DATA)/val run.out_dir=$(DEMO_RUNS)/ablation-$$name/finetune || exit 1; \
	done
	$(PY) -m vitcore.report "mean colour, 80/10/10 (demo)=$(DEMO_RUNS)/pretrained" \
	    $(foreach ab,$(ABLATIONS),$(firstword $(subst :, ,$(ab)))=$(DEMO_RUNS)/ablation-$(firstword $(subst :, ,$(ab)))/finetune) \
	    scratch_same_compute=$(DEMO_RUNS)/scratch_same_compute --out $(DEMO_RUNS)/ablations

# Shards pre-resized to 112 px (shorter side): decoding costs little next to training, and the
# fine-tuning crops (64 px; up to 112 px for other recipes) still come from real pixels.
$(DEMO_DATA)/%/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(IMAGENETTE) --split $* --resize 112 --out $(DEMO_DATA)/$*

data/experiment/%/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(DATASET) --split $* --resize 112 --out data/experiment/$*

# The experiment's few-labels set: the first EXP_PER_CLASS images of every class in a seeded shuffle
# of the training split (95 per class: 10% of Imagenette's labels); the sweep's split: the seeded
# shuffle of the training split cut into its first 1,000 images (held out) and the rest.
$(EXP_DATA)/train-10pct/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(DATASET) --split train --resize 112 --per-class $(EXP_PER_CLASS) \
	    --out $(EXP_DATA)/train-10pct
$(EXP_DATA)/sweep-train/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(DATASET) --split train --resize 112 --offset 1000 --out $(EXP_DATA)/sweep-train
$(EXP_DATA)/sweep-holdout/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(DATASET) --split train --resize 112 --limit 1000 --out $(EXP_DATA)/sweep-holdout

# The monitor's sets: the first MONITOR_<split> images of a seeded shuffle of the split (make picks
# these rules over the ones above: their stem is shorter)
$(DEMO_DATA)/monitor-%/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(IMAGENETTE) --split $* --resize 112 --limit $(MONITOR_$*) \
	    --out $(DEMO_DATA)/monitor-$*

data/experiment/monitor-%/index.json: | setup
	$(PY) -m vitcore.data.shards --source $(DATASET) --split $* --resize 112 --limit $(MONITOR_$*) \
	    --out data/experiment/monitor-$*

bench: setup
	@for b in $(filter-out benchmarks/gpu_check.py,$(wildcard benchmarks/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs data benchmarks/results .pytest_cache
